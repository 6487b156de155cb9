"""The parts of multi-process training that run in one process: how a network is cut into units, and
the plain copy export reads (the runs themselves: tests/test_data_parallel.py)."""

from __future__ import annotations

import copy

import torch

from stepdistill import sharding
from stepdistill.models import networks
from stepdistill.models.networks import FAKE_SCORE, STUDENT


def test_every_weight_of_a_unet_lies_in_exactly_one_unit_and_none_in_the_network_itself(tiny_pipeline):
    unet = tiny_pipeline.unet
    units = sharding.units(unet)
    owned = [id(p) for unit in units for p in unit.parameters()]
    assert len(owned) == len(set(owned)) == len(list(unet.parameters()))
    assert set(unet.down_blocks) <= set(units) and unet.mid_block in units and unet.time_embedding in units
    assert unet.down_blocks not in units  # a list of blocks is laid out block by block


def test_a_plain_copy_rebuilds_class_config_and_lora_adapters_from_whole_weights(tiny_pipeline):
    teacher = copy.deepcopy(tiny_pipeline.unet)  # the session's pipeline keeps no adapters
    nets = networks.build_networks(teacher, None, use_lora=True, lora_rank=2)
    network = nets.student.network
    with torch.no_grad():
        for name, param in network.named_parameters():
            if ".lora_B." in name:
                param.normal_()
    plain = networks.plain_copy(network, network.state_dict())
    assert type(plain) is type(network) and plain is not network
    assert set(plain.peft_config) == {STUDENT, FAKE_SCORE}
    ours, theirs = plain.state_dict(), network.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not any(p.requires_grad for p in plain.parameters())
