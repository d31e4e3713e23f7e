"""The ``vlbert.data`` package's own names: lazy, and the same objects as in their modules."""

import importlib
import subprocess
import sys

import pytest

import vlbert.data

# Written out here, not read from the package: the public names and where each is defined.
PUBLIC = {
    "PretrainStream": "vlbert.data.mixture",
    "build_pretrain_stream": "vlbert.data.mixture",
    "build_validation_stream": "vlbert.data.mixture",
    "Cursor": "vlbert.data.shards",
    "ShardStream": "vlbert.data.shards",
    "SkipCounter": "vlbert.data.shards",
    "expand_urls": "vlbert.data.shards",
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_each_public_name_is_the_object_its_module_defines(name):
    """Fails if a name maps to the wrong module, or the lookup returns anything but the module's
    own object."""
    module = importlib.import_module(PUBLIC[name])
    assert getattr(vlbert.data, name) is getattr(module, name)
    assert getattr(module, name).__module__ == PUBLIC[name]


def test_all_lists_exactly_the_public_names_in_order():
    """Fails if ``__all__`` gains, loses or reorders a name (``from vlbert.data import *``)."""
    assert vlbert.data.__all__ == ["Cursor", "PretrainStream", "ShardStream", "SkipCounter",
                                   "build_pretrain_stream", "build_validation_stream", "expand_urls"]


def test_an_unknown_name_is_an_attribute_error_that_names_it():
    """Fails if an unknown name returns something (None) instead of raising, or the message does
    not name the missing attribute as Python's own does."""
    with pytest.raises(AttributeError) as err:
        vlbert.data.NoSuchThing  # noqa: B018
    assert str(err.value) == "module 'vlbert.data' has no attribute 'NoSuchThing'"
    assert not hasattr(vlbert.data, "masking_rate")


def test_importing_a_light_module_does_not_load_torch_or_pil():
    """The package imports its modules only when a name is asked for, so a light module (masking:
    pure NumPy) stays light. Fails if ``vlbert/data/__init__.py`` imports the stream modules
    eagerly. In a fresh interpreter: this one has torch loaded already."""
    code = ("import sys, vlbert.data.masking, vlbert.data; "
            "print(sorted(m for m in ('torch', 'PIL', 'vlbert.data.mixture', 'vlbert.data.shards') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
