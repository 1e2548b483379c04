"""A unary generation's text decoded once at the end equals what vLLM's incremental detokenizer makes of
the same tokens, step by step: on the demo model's byte-level BPE and on a SentencePiece-style
(Metaspace) tokenizer, whose first generated token's leading space depends on the prompt."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from predictors import detokenize
from predictors.demo_model import _corpus


def _vllm_text(tokenizer: Any, sp: Any, prompt: list[int], ids: list[int], stop_terminated: bool) -> str:
    """vLLM's own detokenizer, fed one token per engine step as the output processor feeds it."""
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer

    request = SimpleNamespace(sampling_params=sp, request_id="r", prompt_token_ids=prompt)
    d = IncrementalDetokenizer.from_new_request(tokenizer, request)  # type: ignore[arg-type]
    for i, t in enumerate(ids):
        d.update([t], stop_terminated and i == len(ids) - 1)
    return d.get_next_output_text(finished=True, delta=False)


@pytest.fixture(scope="module")
def metaspace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-2-style tokenizer (Metaspace, the word-initial space dropped at the start of a text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(_corpus(), trainer)
    out = tmp_path_factory.mktemp("metaspace")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(out)
    return out


def _tokenizer(path: Path) -> Any:
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(path))


@pytest.mark.parametrize("which", ["demo", "metaspace"])
def test_final_text_is_vllms_incremental_text(
    which: str, demo_model_dir: Path, metaspace_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    tokenizer = _tokenizer(demo_model_dir if which == "demo" else metaspace_dir)
    fallbacks = []
    incremental = detokenize._incremental
    monkeypatch.setattr(detokenize, "_incremental", lambda *a: fallbacks.append(1) or incremental(*a))
    rng = random.Random(7)
    vocab = len(tokenizer)
    words = [w for line in _corpus() for w in line.split()]
    cases = 400
    for case in range(cases):
        prompt = tokenizer.encode(" ".join(rng.choices(words, k=rng.randint(1, 6))))
        if case % 2:  # plausible text: words the tokenizer knows
            text = " ".join(rng.choices(words, k=rng.randint(1, 12)))
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:  # any token ids at all, special tokens and lone UTF-8 bytes included
            ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 24))]
        sp = SamplingParams(
            max_tokens=32,
            output_kind=RequestOutputKind.FINAL_ONLY,
            skip_special_tokens=rng.random() < 0.7,
            include_stop_str_in_output=rng.random() < 0.3,
        )
        assert detokenize.deferrable(tokenizer, sp)
        stopped = rng.random() < 0.3
        got = detokenize.final_text(tokenizer, sp, prompt, ids, stopped)
        assert got == _vllm_text(tokenizer, sp, prompt, ids, stopped), (prompt, ids, stopped, sp)
    if which == "demo":  # byte-level: random ids end inside a UTF-8 sequence, which vLLM's loop settles
        assert 0 < len(fallbacks) < cases


def test_the_leading_space_depends_on_the_prompt(metaspace_dir: Path) -> None:
    """Why the decode is primed with the prompt: decoded alone, the first word would lose its space."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    tokenizer = _tokenizer(metaspace_dir)
    sp = SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY)
    prompt = tokenizer.encode("a batch job")
    ids = tokenizer.encode("splits its input", add_special_tokens=False)
    assert tokenizer.decode(ids) == "splits its input"
    assert detokenize.final_text(tokenizer, sp, prompt, ids, False) == " splits its input"


def test_only_plain_unary_requests_are_deferred(demo_model_dir: Path) -> None:
    """Stop strings, logprobs and streams need vLLM's per-step text; a fake engine has no tokenizer."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    tokenizer = _tokenizer(demo_model_dir)
    final = RequestOutputKind.FINAL_ONLY
    assert detokenize.deferrable(tokenizer, SamplingParams(output_kind=final))
    assert not detokenize.deferrable(None, SamplingParams(output_kind=final))
    assert not detokenize.deferrable(tokenizer, SamplingParams(output_kind=RequestOutputKind.DELTA))
    assert not detokenize.deferrable(tokenizer, SamplingParams(output_kind=final, stop=["x"]))
    assert not detokenize.deferrable(tokenizer, SamplingParams(output_kind=final, logprobs=0))
    assert not detokenize.deferrable(tokenizer, SamplingParams(output_kind=final, prompt_logprobs=1))
    plain_specials = SamplingParams(
        output_kind=final, skip_special_tokens=False, spaces_between_special_tokens=False
    )
    assert not detokenize.deferrable(tokenizer, plain_specials)
