"""resize-vocab: old rows bit-identical, logits of old ids unchanged at TP=1 and TP=2, sane new rows."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import QUIET, ROOT, TINY, viq_mllm

LOGITS = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from megatron.core import tensor_parallel
    from megatron_ext.model.gpt import gpt_from_checkpoint
    from megatron_ext.training.parallel import init_distributed, shutdown

    old, new, tp, out = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    layout = init_distributed(tp, 1, 0)
    results = {}
    for name, path in (("old", old), ("new", new)):
        gpt, meta = gpt_from_checkpoint(path, layout, seed=123)
        tokens = (torch.arange(48) * 7 % meta.vocab.text_size)[None]
        with torch.no_grad():
            logits = gpt(tokens, torch.arange(48)[None], None)
        results[name] = tensor_parallel.gather_from_tensor_model_parallel_region(logits)[0]
        results[name + "_embedding"] = tensor_parallel.gather_from_tensor_model_parallel_region(
            gpt.embedding.word_embeddings.weight.T.contiguous()).T
    if layout.rank == 0:
        torch.save(results, out)
    shutdown()
    """
)


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    from viq_mllm.data.text import stdlib_docs_corpus
    from viq_mllm.viq import ViQTokenizer
    from viq_mllm.vocab.extend import extend_vocab
    from viq_mllm.vocab.text_tokenizers import train_sentencepiece

    root = tmp_path_factory.mktemp("resize")
    sp = train_sentencepiece(stdlib_docs_corpus()[:1500], root / "text.model", 500)
    viq = ViQTokenizer.from_config("tiny", preset="2k").save_pretrained(root / "viq")
    extend_vocab(sp, viq, root / "vocab")
    # trained at TP=2 and untied, so both tables are resized and the source is sharded
    viq_mllm("train", TINY, "--nproc", "2", "parallel.tp=2", f"run.dir={root / 'run'}", *QUIET, "train.steps=3",
             "train.warmup_steps=1", "checkpoint.every=3", f"data.tokenizer=sentencepiece:{sp}",
             "model.tie_embeddings=false")
    old = root / "run" / "checkpoints" / "step_00000003"
    viq_mllm("resize-vocab", "--checkpoint", str(old), "--vocab", str(root / "vocab"), "--out", str(root / "new"))
    return root, old, root / "new"


def _logits(root, old, new, tp):
    out = root / f"logits_tp{tp}.pt"
    script = root / "logits.py"
    script.write_text(LOGITS)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}"]
    subprocess.run([*launch, str(script), str(old), str(new), str(tp), str(out)], check=True, cwd=ROOT,
                   capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return torch.load(out, weights_only=True)


@pytest.mark.e2e
@pytest.mark.parametrize("tp", [1, 2])
def test_old_token_logits_unchanged(resized, tp):
    root, old, new = resized
    r = _logits(root, old, new, tp)
    text_size = json.loads((root / "vocab" / "vocab.json").read_text())["text_size"]
    assert torch.equal(r["new_embedding"][:text_size], r["old_embedding"][:text_size])
    torch.testing.assert_close(r["new"][:, :text_size], r["old"][:, :text_size], rtol=1e-5, atol=1e-5)
    assert r["new"].shape[-1] == 3072 and r["old"].shape[-1] == 1024


@pytest.mark.e2e
def test_new_rows_are_drawn_from_the_old_statistics(resized):
    root, old, new = resized
    r = _logits(root, old, new, 1)
    vocab = json.loads((root / "vocab" / "vocab.json").read_text())
    table = r["new_embedding"].double()
    old_rows, new_rows = table[: vocab["text_size"]], table[vocab["text_size"] : vocab["code_offset"] + vocab["codebook_size"]]
    assert (new_rows.abs().sum(1) > 0).all(), "no zero rows"
    assert torch.cdist(new_rows, old_rows).min() > 0, "no copies of an old row"
    assert torch.unique(new_rows, dim=0).shape[0] == new_rows.shape[0], "rows differ from each other"
    # a visual position sums 16 code rows (resize-vocab's default --group): the sum starts as a new token would,
    # with the old rows' mean and 1e-2 x their covariance (the default cov_scale)
    codes = table[vocab["code_offset"] : vocab["code_offset"] + vocab["codebook_size"]]
    order = torch.randperm(len(codes), generator=torch.Generator().manual_seed(0))
    sums = codes[order].view(-1, 16, codes.shape[1]).sum(1)
    spread = float(old_rows.std())
    torch.testing.assert_close(sums.mean(0), old_rows.mean(0), atol=0.05 * spread, rtol=0)
    assert float(sums.var(0).sum() / old_rows.var(0).sum()) == pytest.approx(1e-2, rel=0.2)
    torch.testing.assert_close(codes.mean(0), old_rows.mean(0) / 16, atol=0.05 * spread, rtol=0)
    # new tokens start as 'average' tokens: their logits sit near the old tokens' mean logit, no spike
    logits = r["new"].double()
    assert logits[:, vocab["text_size"]:vocab["code_offset"] + 2304].max() < logits[:, : vocab["text_size"]].max()


def test_mismatched_text_vocabulary_is_refused(tmp_path):
    from megatron_ext.convert.vocab_resize import VocabMismatch, check_compatible
    from megatron_ext.training.checkpoint import VocabRecord
    from viq_mllm.vocab import Vocab

    vocab = Vocab.build(500, 2304, "viq-a", "text-aaaa")
    have = VocabRecord(text_size=257, text_fingerprint="bytes-utf8-v1", padded_size=1024)
    with pytest.raises(VocabMismatch, match="257 ids .*bytes-utf8-v1.* built on 500 ids .*text-aaaa"):
        check_compatible(have, vocab, tmp_path)
