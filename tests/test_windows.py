"""Sliding-window and hybrid attention (issue 39, parts 0 and 1): windowed models decode exactly as
transformers' ``generate`` (plain decoding, drafters, trees, batch rows) and, in bfloat16, every
node of a speculative forward equals its path decoded alone; windows the planned attention does
not follow (chunked attention, GPT-Neo's local layers, a layer handing its attention another window
than its config declares) get a clear ``SpecDecodeError``, never silent wrong output."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from click.testing import CliRunner
from helpers import fixed_policy as sd
from helpers.invariance import mismatches
from transformers import AutoModelForCausalLM

from specdecode import SpecDecodeError
from specdecode.cli import main
from specdecode.models import BatchTarget
from specdecode.models.adopt import attention_window, check_window, layer_windows
from specdecode.models.heads import EagleHead, MedusaHeads
from specdecode.models.plan import ForwardPlan
from specdecode.types import Draft

VOCAB, CONTEXT, PROMPT_LEN, NEW = 96, 256, 16, 24
NOT_FOLLOWED = "uses windowed attention that specdecode does not follow"


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


# every way a window of 8 tokens is declared: on every layer (Mistral), from max_window_layers on
# (Qwen2: layer 1 of 2; Qwen3: both), by layer_types (Gemma 2 / 3, hybrid: one local, one global),
# on every layer again (Phi-3)
WINDOWED = {
    "mistral": lambda **kw: tiny("Mistral", sliding_window=8, **kw),
    "qwen2": lambda **kw: tiny("Qwen2", use_sliding_window=True, sliding_window=8,
                               max_window_layers=1, **kw),
    "qwen3": lambda **kw: tiny("Qwen3", use_sliding_window=True, sliding_window=8,
                               max_window_layers=0, **kw),
    "gemma2": lambda **kw: tiny("Gemma2", sliding_window=8, **kw),
    "phi3": lambda **kw: tiny("Phi3", sliding_window=8, **kw),
    "gemma3_text": lambda **kw: tiny("Gemma3Text", sliding_window=8,
                                     layer_types=["sliding_attention", "full_attention"], **kw),
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


@pytest.fixture(scope="module")
def plain():
    return tiny("Qwen2", seed=3)


@pytest.mark.parametrize("model_type", list(WINDOWED))
def test_windowed_models_decode_as_transformers(model_type):
    """Plain decoding, a chain drafter and a draft-model tree (the draft windowed too) give
    transformers' greedy tokens; the window binds from position 8 on (prompts of 16 tokens)."""
    model = WINDOWED[model_type]()
    assert attention_window(model.config, model) == 8 and layer_windows(model)
    draft = WINDOWED[model_type](seed=1)
    for seed in (0, 1):
        expected = reference(model, prompt(seed))
        for drafter, options in (("none", {}), ("ngram", {}),
                                 ("draft-model", {"draft_model": draft, "tree_width": 2})):
            out = sd.generate(model, prompt(seed), drafter=drafter, max_new_tokens=NEW,
                              eos_token_id=[], **options)
            assert out.token_ids == expected, (drafter, seed)


@pytest.mark.parametrize("model_type", list(WINDOWED))
def test_without_the_window_the_output_would_be_wrong(model_type, monkeypatch):
    """The window matters within the test's 40 tokens: ignoring it (no window ever binding)
    changes the output, so the equality above is not vacuous."""
    model = WINDOWED[model_type]()
    monkeypatch.setattr(ForwardPlan, "binding", lambda self, window: None)
    out = sd.generate(model, prompt(), drafter="none", max_new_tokens=NEW, eos_token_id=[])
    assert out.token_ids != reference(model, prompt())


def _tree() -> Draft:
    """Two branches of depth 4 and a leaf under the root: nodes at positions p + 1 .. p + 4."""
    parents = [-1, 0, 1, 2, -1, 4, 5, 6, -1]
    return Draft(torch.tensor([5, 9, 13, 17, 21, 25, 29, 33, 37]), torch.tensor(parents))


@pytest.mark.parametrize("model_type", ["mistral", "gemma3_text"])
def test_a_tree_across_the_window_and_the_rewind(model_type):
    """A draft tree whose nodes' windows start at different keys, checked node by node against
    transformers' forward of the node's whole path without a cache; then a branch is kept (moved
    in the cache) and the next step still equals the uncached forward."""
    model = WINDOWED[model_type]()
    target = BatchTarget(model)
    ids = prompt()[:10]
    row = target.add_row(64)
    target.prefill(row, ids[:-1])
    draft = _tree()
    logits = target.step([ids[-1]], [draft])[0]
    tokens, parents = draft.tokens.tolist(), draft.parents.tolist()

    def path(node: int) -> list[int]:
        out = []
        while node >= 0:
            out.append(tokens[node])
            node = parents[node]
        return out[::-1]

    for node in range(-1, len(draft)):
        full = ids + (path(node) if node >= 0 else [])
        want = model(torch.tensor([full])).logits[0, -1].float()
        torch.testing.assert_close(logits[node + 1], want, rtol=1e-9, atol=1e-9)
    target.keep(row, [4, 5, 6])  # the second branch
    after = ids + path(6)
    nxt = target.step([tokens[7]], [Draft.empty()])[0][0]
    want = model(torch.tensor([after + [tokens[7]]])).logits[0, -1].float()
    torch.testing.assert_close(nxt, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("model_type", list(WINDOWED))
@pytest.mark.e2e
def test_exact_bfloat16_nodes_equal_their_path_alone(model_type):
    """bfloat16, the exact forward: random batch rows (prompts of 2-300 tokens, chains and trees)
    in one forward, each node's logits bitwise equal to its path decoded alone, with the window
    binding in most rows (helpers/invariance.py); Gemma 2 with its soft-capped attention."""
    model = WINDOWED[model_type](dtype=torch.bfloat16)
    assert mismatches(model, exact=True, trials=6, seed=4) == 0


def test_the_exact_attention_applies_soft_capping():
    """softcap * tanh(scores / softcap) before the mask, as Gemma 2's eager attention: close to a
    float32 reference, and far from the same attention without the cap (the logits are large)."""
    from specdecode.models.exact import _attend, additive

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, n, 8).mul(6).to(torch.bfloat16) for n in (4, 128, 128))
    visible = torch.arange(128)[None, :] <= torch.tensor([40, 80, 100, 127])[:, None]
    bias = additive(visible.expand(2, 4, 128))
    scores = (q.float() @ k.float().transpose(-1, -2)) * 0.35
    capped = torch.softmax(5.0 * torch.tanh(scores / 5.0) + bias, -1) @ v.float()
    got = _attend(q, k, v, bias, 0.35, softcap=5.0).float()
    assert (got - capped).abs().max() < 0.05
    assert (_attend(q, k, v, bias, 0.35).float() - capped).abs().max() > 0.5


def test_soft_capped_attention_in_other_half_precision_is_refused():
    """Gemma 2's attention soft-capping is in the exact forward for bfloat16 only: float16 under
    the exact forward is refused, not run without it (float64 / float32 run it through the
    model's own attention, tested above)."""
    model = WINDOWED["gemma2"](dtype=torch.float16)
    with pytest.raises(SpecDecodeError, match="soft-capping"):
        sd.generate(model, prompt(), drafter="none", max_new_tokens=4)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_batch_rows_equal_their_batch_one_output(model_type):
    model = WINDOWED[model_type]()
    prompts = [prompt(seed)[:n] for seed, n in ((0, 16), (1, 5), (2, 12))]
    alone = [sd.generate(model, p, drafter="ngram", max_new_tokens=NEW,
                         eos_token_id=[]).token_ids for p in prompts]
    together = sd.generate_batch(model, prompts, batch_size=3, drafter="ngram",
                                 max_new_tokens=NEW, eos_token_id=[])
    assert [out.token_ids for out in together] == alone


def test_a_layer_window_other_than_the_config_is_refused():
    """A module window the config does not declare (transformers' masks ignore it, its
    attention function is handed it): refused at the first forward."""
    with pytest.raises(SpecDecodeError, match="other sliding windows"):
        sd.generate(with_module_window(), prompt(), drafter="none", max_new_tokens=4)


def gpt_neo_local(vocab: int = VOCAB, dtype=torch.float64):
    """A tiny GPT-Neo with a local (8-token window) layer: a kind the planned attention does not
    follow."""
    config = transformers.GPTNeoConfig(
        vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, window_size=8,
        attention_types=[[["global", "local"], 1]], max_position_embeddings=CONTEXT)
    torch.manual_seed(0)
    return transformers.GPTNeoForCausalLM(config).to(dtype).eval()


def test_windows_not_followed_are_refused(plain):
    with pytest.raises(SpecDecodeError) as err:
        sd.generate(gpt_neo_local(), prompt(), drafter="none")
    assert str(err.value).startswith(f"the target model (gpt_neo) {NOT_FOLLOWED}")
    assert "a window of 8 tokens" in str(err.value)
    with pytest.raises(SpecDecodeError, match=f"the draft model \\(gpt_neo\\) {NOT_FOLLOWED}"):
        sd.generate(plain, prompt(), drafter="draft-model", draft_model=gpt_neo_local())
    chunked = transformers.Llama4TextConfig(attention_chunk_size=8, max_position_embeddings=64)
    with pytest.raises(SpecDecodeError, match=NOT_FOLLOWED):
        check_window(chunked, what="the target model")


def heads() -> dict:
    torch.manual_seed(0)
    return {"eagle": EagleHead(32, 4, 64), "medusa": MedusaHeads(32, VOCAB, 2)}


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_heads_on_a_windowed_target_and_heads_with_a_window(kind, plain):
    model = WINDOWED["mistral"]()
    out = sd.generate(model, prompt(), drafter=kind, head=heads()[kind], max_new_tokens=NEW,
                      eos_token_id=[])
    assert out.token_ids == reference(model, prompt())
    head = heads()[kind]
    head.config = {**head.config, "sliding_window": 8}  # a head config declaring a window
    with pytest.raises(SpecDecodeError) as err:
        sd.generate(plain, prompt(), drafter=kind, head=head)
    assert str(err.value).startswith(f"the {kind} head declares a sliding window (8 tokens)")


@pytest.mark.parametrize("command", ["generate", "bench", "draft"])
def test_cli_prints_the_error(command, tmp_path):
    """``specdecode generate`` / ``bench`` with a target whose window is not followed, and
    ``generate`` with the demo target and such a ``--draft-model``: the message, no traceback."""
    from specdecode.demo import demo_dir

    directory = tmp_path / "windowed"
    gpt_neo_local(vocab=8192, dtype=torch.float32).save_pretrained(directory)
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
    assert f"Error: the {who} model (gpt_neo) {NOT_FOLLOWED}" in result.output
    assert "Traceback" not in result.output


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
    assert set(layer_windows(model).values()) == {CONTEXT - 1}
    assert layer_windows(tiny("Mistral", sliding_window=CONTEXT)) == {}


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
