"""The model zoo (`models/`): tiny models run, are seeded, take overrides, and match Hugging Face.

Real-size configs are only built on the meta device (no storage); their parameter counts are the
published ones (also what HF's models of the same config count, built on meta).
"""

from __future__ import annotations

import re

import pytest
import torch

from models import ZOO_NAMES, build, example_inputs, family_of, model_args
from models.hf import HF_ARCHS, build_hf, hf_example_inputs

TINY_NAMES = [name for name in ZOO_NAMES if name.endswith("-tiny")]
CAUSAL_TINY = [name for name in TINY_NAMES if family_of(name) != "bert"]


def _output(out: object) -> torch.Tensor:
    """The tensor of a HF ModelOutput (logits or last hidden state)."""
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ---------------------------------------------------------------- zoo: names and configs


def test_zoo_has_one_tiny_model_per_family():
    assert sorted(family_of(name) for name in TINY_NAMES) == ["bert", "gpt2", "llama", "opt"]
    assert len(set(ZOO_NAMES)) == len(ZOO_NAMES)


def test_unknown_name_lists_accepted_names():
    with pytest.raises(ValueError, match="accepted names: .*llama-tiny"):
        build("llama-huge")
    with pytest.raises(ValueError, match="accepted names"):
        family_of("nope")


def test_unknown_field_lists_accepted_fields():
    with pytest.raises(ValueError, match=r"n_layer\b.*accepted fields: .*n_layers"):
        build("gpt2-tiny", n_layer=3)


def test_invalid_override_value_is_rejected():
    with pytest.raises(ValueError, match="n_kv_heads"):
        build("llama-tiny", n_kv_heads=3)


def test_overrides_change_model_args():
    model = build("llama-tiny", n_layers=3, hidden_dim=96)
    assert model.args == model_args("llama-tiny", n_layers=3, hidden_dim=96)
    assert len(model.layers) == 3
    assert model.layers[2].feed_forward.w1.out_features == 96


# ---------------------------------------------------------------- zoo: tiny models


@pytest.mark.parametrize("name", TINY_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_forward_shape_and_dtype(name: str, dtype: torch.dtype):
    model = build(name, dtype=dtype)
    assert not model.training
    args, kwargs = example_inputs(model, batch=2, seq=16)
    with torch.no_grad():
        out = model(*args, **kwargs)
    width = model.args.dim if family_of(name) == "bert" else model.args.vocab_size
    assert out.shape == (2, 16, width)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TINY_NAMES)
def test_export_shows_layers_in_nn_module_stack(name: str):
    model = build(name)
    args, kwargs = example_inputs(model)
    ep = torch.export.export(model, args, kwargs)
    paths = {path for node in ep.graph.nodes for path, _ in node.meta.get("nn_module_stack", {}).values()}
    assert {"layers.0", "layers.1"} <= paths


@pytest.mark.parametrize("name", TINY_NAMES)
def test_seed_determines_weights(name: str):
    rng_before = torch.get_rng_state()
    a, b, c = build(name, seed=1), build(name, seed=1), build(name, seed=2)
    assert torch.equal(torch.get_rng_state(), rng_before)  # build leaves the global RNG alone
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    args, kwargs = example_inputs(a)
    with torch.no_grad():
        assert torch.equal(a(*args, **kwargs), b(*args, **kwargs))
        assert not torch.allclose(a(*args, **kwargs), c(*args, **kwargs))


@pytest.mark.parametrize("name", CAUSAL_TINY)
def test_causal_lm_ignores_future_tokens(name: str):
    model = build(name)
    (ids,), _ = example_inputs(model, seq=12)
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % model.args.vocab_size
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :8], after[:, :8])
    assert not torch.allclose(before[:, 8:], after[:, 8:])


def test_bert_ignores_padded_tokens():
    model = build("bert-tiny")
    (ids,), kwargs = example_inputs(model, batch=2, seq=16)
    mask = kwargs["attention_mask"]
    assert mask[-1, -4:].eq(0).all() and mask[0].eq(1).all()  # some padding, in the last row only
    changed = torch.where(mask.bool(), ids, (ids + 1) % model.args.vocab_size)
    with torch.no_grad():
        before, after = model(ids, **kwargs), model(changed, **kwargs)
    keep = mask.bool()
    torch.testing.assert_close(before[keep], after[keep])
    with torch.no_grad():
        unmasked = model(ids)
    assert not torch.allclose(unmasked[-1, :12], before[-1, :12])


def test_llama_tiny_uses_gqa():
    model = build("llama-tiny")
    args = model.args
    assert args.n_kv_heads < args.n_heads
    assert model.layers[0].attention.wk.out_features == args.n_kv_heads * args.head_dim
    assert model.output.weight is not model.tok_embeddings.weight  # untied lm_head


def test_example_inputs_rejects_too_long_sequence():
    with pytest.raises(ValueError, match="seq"):
        example_inputs(build("gpt2-tiny"), seq=129)


# ---------------------------------------------------------------- zoo: real-size configs


@pytest.mark.parametrize(
    "name, n_params",
    [
        ("tinyllama-1.1b", 1_100_048_384),
        ("gpt2-124m", 124_439_808),  # lm_head tied to wte, counted once
        ("opt-125m", 125_239_296),  # lm_head tied to embed_tokens, counted once
        ("minilm-l6", 22_565_376),  # without the pooler
        ("bert-base", 108_891_648),  # without the pooler
    ],
)
def test_real_size_parameter_count_on_meta(name: str, n_params: int):
    model = build(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_tinyllama_config():
    args = model_args("tinyllama-1.1b")
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.hidden_dim) == (2048, 22, 32, 4, 5632)
    assert (args.vocab_size, args.max_seq_len, args.rope_theta, args.norm_eps) == (32000, 2048, 10000.0, 1e-5)


# ---------------------------------------------------------------- Hugging Face builders


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hf_sdpa_matches_eager(arch: str):
    outputs = []
    for impl in ("sdpa", "eager"):
        model = build_hf(arch, attn_implementation=impl)
        assert not model.training
        assert model.config._attn_implementation == impl
        args, kwargs = hf_example_inputs(model, batch=2, seq=16)
        with torch.no_grad():
            outputs.append(_output(model(*args, **kwargs)))
    width = 64 if arch == "bert" else 256
    assert outputs[0].shape == (2, 16, width)
    # Same weights (same seed), same math; only the attention kernel differs: fp32 rounding.
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)


def test_hf_builders_are_tiny_and_seeded():
    llama = build_hf("llama")
    assert type(llama).__name__ == "LlamaForCausalLM"
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads
    assert (llama.config.hidden_size, llama.config.num_hidden_layers) == (64, 2)
    assert [type(build_hf(a)).__name__ for a in ("gpt2", "bert", "opt")] == [
        "GPT2LMHeadModel",
        "BertModel",
        "OPTForCausalLM",
    ]
    same, other = build_hf("llama"), build_hf("llama", seed=1)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(llama.state_dict()[w], same.state_dict()[w])
    assert not torch.equal(llama.state_dict()[w], other.state_dict()[w])
    assert build_hf("gpt2", n_layer=3).config.n_layer == 3


def test_hf_bad_arch_and_field():
    with pytest.raises(ValueError, match="accepted: gpt2, llama, bert, opt"):
        build_hf("mistral")
    with pytest.raises(ValueError, match="num_layers"):
        build_hf("llama", num_layers=3)


def test_hf_example_inputs():
    _, kwargs = hf_example_inputs(build_hf("opt"), batch=2, seq=8)
    assert kwargs["input_ids"].shape == (2, 8) and kwargs["use_cache"] is False
    _, kwargs = hf_example_inputs(build_hf("bert"), batch=2, seq=8)
    assert kwargs["attention_mask"][-1].tolist() == [1] * 6 + [0] * 2


# ---------------------------------------------------------------- zoo == HF, given HF's weights

# HF state-dict key -> zoo key, per family: (regex, replacement) rules applied in order.
_HF_TO_ZOO: dict[str, list[tuple[str, str]]] = {
    "gpt2": [(r"^transformer\.h\.", "layers."), (r"^transformer\.", "")],
    "llama": [
        (r"^model\.embed_tokens", "tok_embeddings"),
        (r"^model\.norm", "norm"),
        (r"^lm_head", "output"),
        (r"^model\.", ""),
        (r"self_attn\.([qkvo])_proj", r"attention.w\1"),
        (r"mlp\.gate_proj", "feed_forward.w1"),
        (r"mlp\.up_proj", "feed_forward.w3"),
        (r"mlp\.down_proj", "feed_forward.w2"),
        (r"input_layernorm", "attention_norm"),
        (r"post_attention_layernorm", "ffn_norm"),
    ],
    "bert": [
        (r"^embeddings\.LayerNorm", "emb_norm"),
        (r"^embeddings\.", ""),
        (r"^encoder\.layer\.", "layers."),
        (r"attention\.self\.", "attention."),
        (r"attention\.output\.dense", "attention.out"),
        (r"attention\.output\.LayerNorm", "attn_norm"),
        (r"intermediate\.dense", "ffn.fc1"),
        (r"output\.dense", "ffn.fc2"),
        (r"output\.LayerNorm", "ffn_norm"),
    ],
    "opt": [(r"^model\.decoder\.", "")],
}

_ZOO_TINY_FOR_HF = {"gpt2": "gpt2-tiny", "llama": "llama-tiny", "bert": "bert-tiny", "opt": "opt-tiny"}


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_zoo_matches_hf_with_hf_weights(arch: str):
    hf_model = build_hf(arch, attn_implementation="eager")
    overrides = {"norm_eps": hf_model.config.rms_norm_eps} if arch == "llama" else {}
    model = build(_ZOO_TINY_FOR_HF[arch], **overrides)
    wanted = model.state_dict()
    state = {}
    for key, value in hf_model.state_dict().items():
        for pattern, replacement in _HF_TO_ZOO[arch]:
            key = re.sub(pattern, replacement, key)
        if key not in wanted:
            continue  # HF-only buffers (position_ids, ...)
        if arch == "gpt2" and value.dim() == 2 and "layers." in key:
            value = value.t()  # HF GPT-2 uses Conv1D: weight is (in, out)
        state[key] = value
    model.load_state_dict(state, strict=True)

    args, kwargs = hf_example_inputs(hf_model, batch=2, seq=16)
    kwargs.pop("use_cache", None)  # zoo models have no KV cache argument
    with torch.no_grad():
        expected = _output(hf_model(*args, **kwargs))
        actual = model(**kwargs)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
