import pytest
from diffusers import DDPMPipeline, DDPMScheduler, StableDiffusionPipeline, UNet2DModel

from stepdistill.models.loading import PipelineError, load_pipeline


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "no" / "such" / "pipeline"
    with pytest.raises(PipelineError, match="does not exist") as error:
        load_pipeline(missing)
    assert str(missing) in str(error.value)


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(PipelineError, match="model_index.json") as error:
        load_pipeline(tmp_path)
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize("name", ["not a pipeline", "a/b/c", "/owner", "owner/", "./owner/name"])
def test_neither_path_nor_hub_id(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="not a hub id"):
        load_pipeline(name)


def test_hub_id_offline_says_so_and_how_to_pass_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError) as error:
        load_pipeline("stepdistill-tests/no-such-model")
    assert str(error.value) == (
        "stepdistill-tests/no-such-model is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download "
        "it where there is network (`hf download stepdistill-tests/no-such-model`) and pass its folder, or point "
        "HF_HOME at a cache that holds it")


class Unreachable(Exception):
    """Stands for the HTTP client's connection error."""


def test_hub_id_with_the_hub_unreachable_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def unreachable(repo_id, **kwargs):
        raise Unreachable("[Errno -2] Name or service not known")

    monkeypatch.setattr("huggingface_hub.model_info", unreachable)
    with pytest.raises(PipelineError, match="not in the local Hugging Face cache and the hub cannot be reached "
                                            r"\(Unreachable: offline\?\): download it"):
        load_pipeline("stepdistill-tests/no-such-model")


def test_hub_id_that_does_not_exist_says_so(tmp_path, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def not_found(repo_id, **kwargs):
        raise RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its constructor wants an HTTP response

    monkeypatch.setattr("huggingface_hub.model_info", not_found)
    with pytest.raises(PipelineError, match="no model stepdistill-tests/no-such-model on the Hugging Face Hub"):
        load_pipeline("stepdistill-tests/no-such-model")


def test_unconditional_pipeline_is_not_text_to_image(tmp_path):
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    with pytest.raises(PipelineError, match="not a text-to-image pipeline") as error:
        load_pipeline(tmp_path)
    assert "DDPMPipeline" in str(error.value)


def test_loads_the_tiny_sd_folder(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.safety_checker is None
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    assert load_pipeline(str(tiny_pipeline_dir)).text_encoder is not None
