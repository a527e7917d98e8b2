"""Model loading: the embedded default offline, local folders, clear errors."""

from __future__ import annotations

import pytest

from storage.models import ModelLoadError, ModelSpec, load_model, resolve_source


def test_embedded_minilm_loads_offline():
    lm = load_model(ModelSpec())
    assert (lm.architecture, lm.n_layers, lm.d_model) == ("BertModel", 6, 384)
    assert lm.revision.startswith("sha256:")
    assert lm.spec.trust_remote_code is False


def test_unknown_model_name_says_why():
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_model(ModelSpec(name="no-such-org/no-such-model"))


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ModelLoadError, match="not a model folder"):
        resolve_source(str(tmp_path))


def test_missing_local_folder_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))


def test_bad_dtype_and_device():
    with pytest.raises(ModelLoadError, match="dtype"):
        ModelSpec(dtype="int3")
