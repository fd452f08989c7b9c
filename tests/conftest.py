"""Shared fixtures (model factories live in helpers.py so tests can import them)."""

from __future__ import annotations

import pytest

from .helpers import make_swin, make_vit_avg_reg, make_vit_token, sharpen


@pytest.fixture
def vit_token():
    return sharpen(make_vit_token())


@pytest.fixture
def vit_avg_reg():
    return sharpen(make_vit_avg_reg())


@pytest.fixture
def swin():
    return sharpen(make_swin())
