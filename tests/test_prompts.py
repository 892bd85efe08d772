"""TAB prompt ensembles: the sentences, and class vectors that are unit-length and computed once."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from defectclip import prompts
from defectclip.prompts import (
    ABNORMAL_STATES,
    INDUSTRIAL_TEMPLATES,
    NORMAL_STATES,
    PROMPT_LEVELS,
    PromptSettings,
    abnormal_sentences,
    class_text_vectors,
    normal_sentences,
)
from defectclip.towers import build_text_tower


class CountingTower:
    """Wraps a text tower and counts the sentences it encodes, to see when the caches answer."""

    def __init__(self, tower):
        self.tower = tower
        self.spec = tower.spec
        self.dim = tower.dim
        self.encoded = 0

    def encode(self, texts):
        self.encoded += len(texts)
        return self.tower.encode(texts)


@pytest.fixture(scope="module")
def tiny_text():
    return build_text_tower("tiny:text")


@pytest.fixture
def counting(tiny_text):
    prompts.clear_memory_cache()
    yield CountingTower(tiny_text)
    prompts.clear_memory_cache()


def _state_words(states):
    return [state.replace("{}", "").strip() for state in states if state != "{}"]


def test_sentences_name_the_object_and_their_state():
    normal, abnormal = normal_sentences("magnetic tile"), abnormal_sentences("magnetic tile")
    assert all("magnetic tile" in s for s in normal + abnormal)
    for word in _state_words(NORMAL_STATES):
        assert any(word in s for s in normal), word
    for word in _state_words(ABNORMAL_STATES):
        assert any(word in s for s in abnormal), word
    # No normal sentence carries an abnormal state, and the reverse.
    assert not any(w in s for s in normal for w in ("damaged", "broken", "defective", "with a defect"))
    assert not any(w in s for s in abnormal for w in ("flawless", "pristine", "without"))
    assert "a photo of the magnetic tile without flaw on a manufacturing line." in normal
    assert "a photo of a damaged magnetic tile for industrial inspection." in abnormal


def test_prompt_levels_grow_like_tabs_ablation():
    counts = [len(normal_sentences("screw", PromptSettings(level))) for level in PROMPT_LEVELS]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert normal_sentences("screw", PromptSettings("two-class")) == ["a photo of a unblemished screw."]
    assert abnormal_sentences("screw", PromptSettings("two-class")) == ["a photo of a blemished screw."]
    industrial_only = INDUSTRIAL_TEMPLATES[0].format("screw")
    assert industrial_only in normal_sentences("screw")
    assert industrial_only not in normal_sentences("screw", PromptSettings("clip-template"))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="object name"):
        normal_sentences("  ")
    with pytest.raises(ValueError, match="prompt level"):
        PromptSettings("three-class")
    with pytest.raises(ValueError, match="non-empty list"):
        class_text_vectors(None, "screw")


def test_class_vectors_are_unit_length_and_state_specific(counting):
    normal, abnormal = class_text_vectors(counting, ["screw", "magnetic tile"])
    assert normal.shape == abnormal.shape == (2, counting.dim)
    assert torch.allclose(normal.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(abnormal.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(normal, abnormal)
    # Each row is the normalised mean of that object's sentence embeddings.
    expected = torch.nn.functional.normalize(counting.tower.encode(normal_sentences("screw")).mean(0), dim=-1)
    assert torch.allclose(normal[0], expected, atol=1e-5)


def test_class_vectors_are_cached_in_memory_and_on_disk(counting, tiny_text, tmp_path):
    first = class_text_vectors(counting, ["screw"], cache_dir=tmp_path)
    sentences = len(normal_sentences("screw")) + len(abnormal_sentences("screw"))
    assert counting.encoded == sentences
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    with safe_open(str(files[0]), framework="pt") as handle:
        assert handle.metadata()["object"] == "screw" and handle.metadata()["text_spec"] == "tiny:text"

    class_text_vectors(counting, ["screw"], cache_dir=tmp_path)
    assert counting.encoded == sentences  # answered from memory

    prompts.clear_memory_cache()
    fresh = CountingTower(tiny_text)
    again = class_text_vectors(fresh, ["screw"], cache_dir=tmp_path)
    assert fresh.encoded == 0  # answered from disk
    assert all(torch.equal(a, b) for a, b in zip(first, again))

    class_text_vectors(fresh, ["screw"], PromptSettings("two-class"), cache_dir=tmp_path)
    assert fresh.encoded == 2  # another sentence list is another key
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
