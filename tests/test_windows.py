"""Sliding-window attention (issue 39, part 0): a model whose attention window can bind is refused
with a clear ``SpecDecodeError`` (target, draft model, heads, CLI), never decoded silently wrong;
models whose window is off or never binds still decode exactly as transformers' ``generate``."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import specdecode as sd
from specdecode import SpecDecodeError
from specdecode.cli import main
from specdecode.models.adapter import attention_window
from specdecode.models.heads import EagleHead, MedusaHeads

VOCAB, CONTEXT, PROMPT_LEN, NEW = 96, 256, 16, 24
UNSUPPORTED = "sliding-window attention is not supported yet"


def tiny(kind: str, *, seed: int = 0, vocab: int = VOCAB, dtype=torch.float64, **options):
    """A random 2-layer causal LM of config class ``kind`` (e.g. "Mistral") with ``options``."""
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=CONTEXT, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        tie_word_embeddings=False, **options)
    torch.manual_seed(seed)
    attention = "eager" if kind == "Gemma2" else "sdpa"  # Gemma 2 has no SDPA path
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)  # peaked: the ngram drafter finds repeats
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model.to(dtype).eval()


def with_module_window(seed: int = 0, vocab: int = VOCAB):
    """A plain Qwen2 whose second layer's attention module carries its own 8-token window."""
    model = tiny("Qwen2", seed=seed, vocab=vocab)
    model.model.layers[1].self_attn.sliding_window = 8
    return model


# (model type in the error, builder): every way a window of 8 tokens can be declared
WINDOWED = {
    "mistral": lambda **kw: tiny("Mistral", sliding_window=8, **kw),
    "qwen2": lambda **kw: tiny("Qwen2", use_sliding_window=True, sliding_window=8,
                               max_window_layers=1, **kw),
    "qwen3": lambda **kw: tiny("Qwen3", use_sliding_window=True, sliding_window=8,
                               max_window_layers=0, **kw),
    "gemma2": lambda **kw: tiny("Gemma2", sliding_window=8, **kw),
    "gemma3_text": lambda **kw: tiny("Gemma3Text", sliding_window=8, **kw),
    "qwen2 module": with_module_window,
}


def prompt(seed: int = 0) -> list[int]:
    pattern = torch.randint(0, VOCAB, (5,), generator=torch.Generator().manual_seed(seed))
    return (pattern.tolist() * 4)[:PROMPT_LEN]


def reference(model, ids: list[int]) -> list[int]:
    """transformers' greedy output."""
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                         max_new_tokens=NEW, pad_token_id=0)
    return out[0, len(ids):].tolist()


def refused(message: str, who: str, model_type: str) -> None:
    assert message.startswith(f"{who} ({model_type.split()[0]}) uses sliding-window attention")
    assert "a window of 8 tokens" in message and UNSUPPORTED in message, message


@pytest.fixture(scope="module")
def plain():
    return tiny("Qwen2", seed=3)


@pytest.mark.parametrize("model_type", list(WINDOWED))
def test_windowed_target_is_refused(model_type):
    model = WINDOWED[model_type]()
    assert attention_window(model.config, model) == 8
    for drafter in ("none", "ngram"):
        with pytest.raises(SpecDecodeError) as err:
            sd.generate(model, prompt(), drafter=drafter, max_new_tokens=NEW)
        refused(str(err.value), "the target model", model_type)


@pytest.mark.parametrize("model_type", [t for t in WINDOWED if "module" not in t])
def test_without_the_refusal_the_output_would_be_wrong(model_type, monkeypatch):
    """The refusal is not vacuous: these windows bind within the test's 40 tokens (transformers'
    SDPA and eager paths ignore a module's own window, so the module case is left out)."""
    import specdecode.models.adapter as adapter

    model = WINDOWED[model_type]()
    monkeypatch.setattr(adapter, "check_window", lambda *args, **kwargs: None)
    out = sd.generate(model, prompt(), drafter="none", max_new_tokens=NEW, eos_token_id=[])
    assert out.token_ids != reference(model, prompt())


@pytest.mark.parametrize("model_type", list(WINDOWED))
def test_windowed_draft_model_is_refused(model_type, plain):
    draft = WINDOWED[model_type](seed=1)
    with pytest.raises(SpecDecodeError) as err:
        sd.generate(plain, prompt(), drafter="draft-model", draft_model=draft, max_new_tokens=NEW)
    refused(str(err.value), "the draft model", model_type)


def heads() -> dict:
    torch.manual_seed(0)
    return {"eagle": EagleHead(32, 4, 64), "medusa": MedusaHeads(32, VOCAB, 2)}


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_heads_on_a_windowed_target_or_with_a_window_are_refused(kind, plain):
    with pytest.raises(SpecDecodeError) as err:
        sd.generate(WINDOWED["mistral"](), prompt(), drafter=kind, head=heads()[kind])
    refused(str(err.value), "the target model", "mistral")
    head = heads()[kind]
    head.config = {**head.config, "sliding_window": 8}  # a head config declaring a window
    with pytest.raises(SpecDecodeError) as err:
        sd.generate(plain, prompt(), drafter=kind, head=head)
    assert str(err.value).startswith(f"the {kind} head uses sliding-window attention")
    assert UNSUPPORTED in str(err.value)
    assert sd.generate(plain, prompt(), drafter=kind, head=heads()[kind], max_new_tokens=NEW,
                       eos_token_id=[]).token_ids == reference(plain, prompt())


@pytest.mark.parametrize("command", ["generate", "bench", "draft"])
def test_cli_prints_the_error(command, tmp_path):
    """``specdecode generate`` / ``bench`` with a windowed target, and ``generate`` with the demo
    target and a windowed ``--draft-model``: the message, no traceback."""
    from specdecode.demo import demo_dir

    directory = tmp_path / "windowed"
    model = tiny("Mistral", sliding_window=8, vocab=8192, dtype=torch.float32)
    model.save_pretrained(directory)
    for name in (demo_dir() / "tokenizer").iterdir():
        shutil.copy(name, directory / name.name)
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "category": "qa", "turns": ["Hello there"]}\n')
    target = ["--target", str(directory)]
    args = {"generate": ["generate", *target, "--prompt", "Hello there", "--drafter", "none"],
            "bench": ["bench", *target, "--questions", str(questions), "--methods",
                      "vanilla,ngram", "--out", str(tmp_path / "out"), "--max-new-tokens", "4"],
            "draft": ["generate", "--draft-model", str(directory), "--prompt", "Hello there",
                      "--drafter", "draft-model"]}[command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    who = "draft" if command == "draft" else "target"
    assert f"Error: the {who} model (mistral) uses sliding-window attention" in result.output
    assert UNSUPPORTED in result.output and "Traceback" not in result.output


# negative checks: the window is off, absent, or never binds (>= the context): these decode, and
# equal transformers' greedy output token for token
DECODING = {
    "qwen2 default": lambda: tiny("Qwen2"),
    "qwen2 off": lambda: tiny("Qwen2", use_sliding_window=False, sliding_window=8),
    "qwen3 default": lambda: tiny("Qwen3"),
    "qwen3 off": lambda: tiny("Qwen3", use_sliding_window=False, sliding_window=8),
    # on, but every layer is below max_window_layers: no layer gets the window
    "qwen2 no windowed layer": lambda: tiny("Qwen2", use_sliding_window=True, sliding_window=8),
    "mistral no window": lambda: tiny("Mistral", sliding_window=None),
    "mistral window = context": lambda: tiny("Mistral", sliding_window=CONTEXT),
    "mistral window > context": lambda: tiny("Mistral", sliding_window=4 * CONTEXT),
    "gemma2 window = context": lambda: tiny("Gemma2", sliding_window=CONTEXT),
}


@pytest.mark.parametrize("name", list(DECODING))
@pytest.mark.e2e
def test_models_without_a_binding_window_match_transformers(name, plain):
    model = DECODING[name]()
    assert attention_window(model.config, model) is None
    for seed in (0, 1):
        ids = prompt(seed)
        expected = reference(model, ids)
        for drafter in ("none", "ngram"):
            out = sd.generate(model, ids, drafter=drafter, max_new_tokens=NEW, eos_token_id=[])
            assert out.token_ids == expected, (drafter, seed)
    other = tiny("Qwen2", seed=1)
    out = sd.generate(plain, prompt(), drafter="draft-model", draft_model=model,
                      max_new_tokens=NEW, eos_token_id=[], tree_width=2)
    assert out.token_ids == reference(plain, prompt())
    out = sd.generate(model, prompt(), drafter="draft-model", draft_model=other,
                      max_new_tokens=NEW, eos_token_id=[], tree_width=2)
    assert out.token_ids == reference(model, prompt())


def test_a_window_one_short_of_the_context_binds():
    model = tiny("Mistral", sliding_window=CONTEXT - 1)
    assert attention_window(model.config, model) == CONTEXT - 1
    with pytest.raises(SpecDecodeError, match=f"a window of {CONTEXT - 1} tokens"):
        sd.generate(model, prompt(), drafter="none")


@pytest.mark.parametrize("kind,options,window", [
    ("Qwen2Config", {}, None),  # use_sliding_window=False clears sliding_window
    ("Qwen2Config", {"use_sliding_window": True}, 4096),  # layers 28.. of 32 are sliding
    ("Qwen3Config", {"use_sliding_window": True, "max_window_layers": 40}, 4096),  # no module to ask
    ("Qwen3MoeConfig", {"use_sliding_window": True}, 4096),
    ("SmolLM3Config", {"use_sliding_window": False, "sliding_window": 64}, None),
    ("MistralConfig", {}, 4096),
    ("MistralConfig", {"sliding_window": 4096, "max_position_embeddings": 4096}, None),
    ("MixtralConfig", {}, None),
    ("MixtralConfig", {"sliding_window": 512}, 512),
    ("Phi3Config", {"sliding_window": 2047}, 2047),
    ("Starcoder2Config", {"sliding_window": 1024}, 1024),
    ("Gemma2Config", {}, 4096),
    ("Gemma3Config", {}, 4096),  # the text config is nested
    ("Cohere2Config", {}, 4096),
    ("Llama4Config", {}, 8192),  # chunked attention
    ("GptOssConfig", {}, 128),
    ("GPTNeoConfig", {}, 256),  # "local" attention_layers
    ("LlamaConfig", {}, None),
])
def test_transformers_configs(kind, options, window):
    """What transformers' own configs declare, without a model to ask."""
    assert attention_window(getattr(transformers, kind)(**options)) == window
