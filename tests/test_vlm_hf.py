"""A VLM on a real LLM (SmolLM2-135M) started from its HF folder by one recipe, trained a step, exported as an HF
folder: HF's own Llama gives the megatron model's logits on packed multimodal rows and its greedy answers, for one
code per position (a stock model fed input_ids) and sixteen (inputs_embeds); the export converts back; text
ability is kept."""

import shutil

import pytest
import torch
from conftest import QUIET, ROOT, viq_mllm

SMOL = str(ROOT / "recipes" / "vlm_smollm2_135m_pretrain.yaml")
SEQ = {1: 512, 16: 256}  # a 160 x 96 px image is 240 + 8 positions at one code per position


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.fixture(scope="module")
def trained(smollm2, vlm_assets, tmp_path_factory):
    """group -> (checkpoint, exported folder); the second run reuses the first one's start (built once)."""
    root = tmp_path_factory.mktemp("vlm_hf")
    runs = {}
    for group in (1, 16):
        run = root / f"g{group}"
        if runs:
            shutil.copytree(root / "g1" / "init", run / "init")
        viq_mllm("train", SMOL, f"run.dir={run}", f"init.hf={smollm2[0]}", f"data.vocab={root / 'vocab'}",
                 f"data.sources=[{{path: {vlm_assets['shards']}}}]", f"model.visual.viq={vlm_assets['viq']}",
                 f"model.visual.group={group}", f"model.seq_length={SEQ[group]}", "train.steps=1",
                 "train.warmup_steps=0", "train.global_batch_size=1", "checkpoint.every=1", *QUIET, timeout=600)
        ckpt = run / "checkpoints" / "step_00000001"
        viq_mllm("export", "hf", "--checkpoint", str(ckpt), "--out", str(root / f"hf{group}"))
        runs[group] = (ckpt, root / f"hf{group}")
    return runs


@pytest.mark.e2e
@pytest.mark.parametrize("group", [1, 16])
def test_the_exported_model_gives_the_megatron_logits_and_greedy_answers(trained, vlm_assets, group):
    from transformers import AutoModelForCausalLM

    from megatron_ext.training.parallel import shutdown
    from megatron_ext.vlm.inference import greedy, load_for_inference
    from megatron_ext.vlm.model import packed_params
    from viq_mllm import hf
    from viq_mllm.data.chat import prompt_document
    from viq_mllm.data.multimodal import documents_from_shards
    from viq_mllm.data.packing import collate, pack
    from viq_mllm.data.shards import CodeShards

    ckpt, folder = trained[group]
    samples = list(CodeShards(vlm_assets["shards"]))[:3]
    try:
        vlm, tokenizer, _ = load_for_inference(ckpt)
        documents = documents_from_shards(CodeShards(vlm_assets["shards"]), tokenizer, "pretrain", group)[:2]
        batch = collate(pack(documents, sum(len(d) for d in documents)))  # one packed row of two documents
        with torch.no_grad():
            ours = vlm(batch, packed_params(batch), labels=False)[0].float()
        answers = [greedy(vlm, tokenizer, prompt_document(tokenizer.text, tokenizer.vocab, s.codes, prompt, group), 10)
                   for s, prompt in zip(samples, ["", "What is in this picture?", "Describe it."])]
    finally:
        shutdown()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    # at G = 16 the code rows live outside the model's vocabulary (viq_slots.safetensors)
    rows = tokenizer.vocab.size if group == 1 else tokenizer.vocab.code_offset
    start = 0
    for document in documents:
        ids = hf.flat_ids(document)
        with torch.no_grad():
            if group == 1:  # a stock model: input_ids as they are
                theirs = model(torch.tensor([ids])).logits[0]
            else:
                theirs = model(inputs_embeds=hf.inputs_embeds(model, ids, folder)).logits[0]
        assert theirs.shape == (len(document), rows)
        assert relative_error(ours[start:start + len(document), :rows], theirs) < 1e-4
        start += len(document)
    for sample, prompt, answer in zip(samples, ["", "What is in this picture?", "Describe it."], answers):
        assert hf.generate(folder, sample.images[0].path, prompt, 10, model)[0] == answer


@pytest.mark.e2e
def test_the_export_serves_as_its_base_model_and_a_group_16_folder_refuses_flat_ids(trained, smollm2, vlm_assets):
    """The context length and bos come from SmolLM2's config, not the training sequence length; a 16-code export fed
    its flat ids as ``input_ids`` (what a stock server does) fails instead of embedding one code per position."""
    import json

    from transformers import AutoModelForCausalLM

    from viq_mllm import hf
    from viq_mllm.data.shards import CodeShards

    base = json.loads((smollm2[0] / "config.json").read_text())
    for group in (1, 16):
        config = json.loads((trained[group][1] / "config.json").read_text())
        assert config["max_position_embeddings"] == base["max_position_embeddings"] != SEQ[group]
        assert config["bos_token_id"] == base["bos_token_id"]
    folder = trained[16][1]
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    image = next(iter(CodeShards(vlm_assets["shards"]))).images[0].path
    with pytest.raises(IndexError):
        model(torch.tensor([hf.prompt_ids(folder, image)]))


@pytest.mark.e2e
def test_generate_hf_is_the_command_line_of_the_same_path(trained, vlm_assets, tmp_path):
    from viq_mllm import hf
    from viq_mllm.data.shards import CodeShards

    _, folder = trained[16]
    image = next(iter(CodeShards(vlm_assets["shards"]))).images[0].path
    viq_mllm("generate", "--hf", str(folder), "--image", image, "--prompt", "What is it?", "--max-new-tokens", "8",
             "--output-ids", str(tmp_path / "ids.txt"))
    assert [int(i) for i in (tmp_path / "ids.txt").read_text().split()] == hf.generate(folder, image, "What is it?", 8)[0]


@pytest.mark.e2e
def test_the_export_converts_back_with_the_same_logits(trained, tmp_path):
    """hf-to-mcore of the exported folder (one code per position) is a text GPT whose logits are HF's."""
    from transformers import AutoModelForCausalLM

    from megatron_ext.model.gpt import gpt_from_checkpoint
    from megatron_ext.training.parallel import init_distributed, shutdown

    _, folder = trained[1]
    viq_mllm("convert", "hf-to-mcore", "--input", str(folder), "--output", str(tmp_path / "mcore"))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    tokens = torch.cat([torch.randint(0, 49152, (1, 12)), torch.randint(49155, vocab, (1, 20))], dim=1)
    try:
        gpt, _ = gpt_from_checkpoint(tmp_path / "mcore", init_distributed(1, 1, 0))
        with torch.no_grad():
            ours = gpt(tokens, torch.arange(tokens.shape[1])[None], None)[..., :vocab]
    finally:
        shutdown()
    with torch.no_grad():
        assert relative_error(ours, model(tokens).logits) < 1e-4


@pytest.mark.e2e
def test_a_step_of_vlm_pretraining_keeps_the_text_ability(trained, smollm2):
    """The exported VLMs' loss on held-out English text (standard-library docstrings, 1,024 tokens) stays within
    0.1 nats of SmolLM2's own. Why 0.1: the text rows are copied bit for bit and the new rows start at the text
    rows' statistics, so only the Adam steps (lr 3e-4) on captions move the network: two steps measured +0.01 (one
    code per position) and +0.03 (sixteen); a broken export (rows shifted, the slot folded into text rows, a lost
    output layer) costs nats, not hundredths."""
    import argparse
    import collections
    import json
    import textwrap

    from transformers import AutoModelForCausalLM

    folder, base, tokenizer = smollm2
    text = "\n\n".join(module.__doc__ for module in (json, textwrap, collections, argparse))
    ids = torch.tensor([tokenizer.encode(text)[:1024]])
    with torch.no_grad():
        reference = float(base(ids, labels=ids).loss)
        for group in (1, 16):
            model = AutoModelForCausalLM.from_pretrained(str(trained[group][1]), dtype=torch.float32).eval()
            assert abs(float(model(ids, labels=ids).loss) - reference) < 0.1, group


@pytest.mark.e2e
def test_init_hf_refuses_a_vocabulary_of_another_tokenizer(smollm2, vlm_assets, tmp_path):
    proc = viq_mllm("train", SMOL, f"run.dir={tmp_path / 'run'}", f"init.hf={smollm2[0]}",
                    f"data.vocab={vlm_assets['vocab']}", f"data.sources=[{{path: {vlm_assets['shards']}}}]",
                    f"model.visual.viq={vlm_assets['viq']}", *QUIET, check=False)
    assert proc.returncode != 0
    from viq_mllm.vocab import Vocab
    from viq_mllm.vocab.text_tokenizers import hf_tokenizer_fingerprint

    assert Vocab.load(vlm_assets["vocab"]).text_fingerprint in proc.stderr
    assert hf_tokenizer_fingerprint(smollm2[0]) in proc.stderr and not (tmp_path / "run" / "init").exists()


CHAT = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A red stamp."},
        {"from": "human", "value": "And this one? <image>"}, {"from": "gpt", "value": "A blue one."}]


def chat_messages(image_text: str) -> list[dict]:
    """:data:`CHAT` as a ``transformers`` user writes it: roles, and each image as its two marker tokens."""
    return [{"role": "user", "content": image_text + "What is this?"}, {"role": "assistant", "content": "A red stamp."},
            {"role": "user", "content": "And this one?" + image_text}, {"role": "assistant", "content": "A blue one."}]


def markers_only(ids: list[int], targets: list[bool], vocab) -> tuple[list[int], list[bool]]:
    """``ids`` (and their target flags) with each image block cut down to its start and end markers."""
    start, end = vocab.special("image_start"), vocab.special("image_end")
    kept, inside = [], False
    for token, target in zip(ids, targets):
        inside = inside and token != end
        if not inside:
            kept.append((token, target))
        inside = inside or token == start
    return [t for t, _ in kept], [f for _, f in kept]


def answer_positions(tokenizer, messages: list[dict], ids: list[int]) -> set[int]:
    """Where each assistant answer and the eos closing it lie in ``ids``, found with ``transformers`` alone: an
    answer starts where the generation prompt of the messages before it ends."""
    positions = set()
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True, return_dict=True)
                        ["input_ids"])
            positions |= set(range(start, ids.index(tokenizer.eos_token_id, start) + 1))
    return positions


def targets_of(document) -> list[bool]:
    return [False] + [bool(m) for m in document.loss_mask.tolist()[:-1]]


@pytest.mark.e2e
def test_apply_chat_template_on_the_export_gives_the_ids_training_saw(trained, vlm_assets):
    """A two-image SFT conversation laid out for training is what ``apply_chat_template`` (SmolLM2's own ChatML,
    shipped in the export) gives, each image block standing for its two markers; training supervises exactly each
    answer and its closing ``<|im_end|>``; and the prompt that ``generate``, ``eval`` and lmms-eval build on the
    export is ``apply_chat_template``'s with the generation prompt."""
    from transformers import AutoTokenizer

    from viq_mllm import hf
    from viq_mllm.data.chat import IMAGE_TEXT, chat_document
    from viq_mllm.data.shards import CodeShards
    from viq_mllm.vocab.tokenizer import MultimodalTokenizer

    ckpt, folder = trained[1]
    training = MultimodalTokenizer.from_dir(ckpt.parents[2] / "vocab")
    exported = AutoTokenizer.from_pretrained(str(folder))
    assert "<|im_start|>" in exported.chat_template
    samples = list(CodeShards(vlm_assets["shards"]))[:2]
    document = chat_document(training.text, training.vocab, [s.images[0].codes for s in samples], CHAT, 1)
    assert int(document.visual.sum()) > 0
    ids, targets = markers_only(document.tokens.tolist(), targets_of(document), training.vocab)
    messages = chat_messages(IMAGE_TEXT)
    assert ids == exported.apply_chat_template(messages, return_dict=True)["input_ids"]
    assert {i for i, target in enumerate(targets) if target} == answer_positions(exported, messages, ids)
    prompt = hf.prompt_ids(folder, samples[0].images[0].path, "What is this?")
    assert markers_only(prompt, [False] * len(prompt), training.vocab)[0] == exported.apply_chat_template(
        messages[:1], add_generation_prompt=True, return_dict=True)["input_ids"]


def test_a_tokenizer_without_a_template_lays_chats_out_as_transformers_renders_the_default(smollm2, tmp_path):
    """The same equalities for a tokenizer with no chat template of its own (the default layout ``export hf`` then
    writes), text only: rendered by ``transformers``, not by the project's renderer."""
    import json

    from transformers import AutoTokenizer

    from viq_mllm.data.chat import chat_document
    from viq_mllm.vocab import Vocab
    from viq_mllm.vocab.text_tokenizers import DEFAULT_CHAT_TEMPLATE, HFTextTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        fields = (smollm2[0] / name).read_text()
        if name == "tokenizer_config.json":
            fields = json.dumps({k: v for k, v in json.loads(fields).items() if k != "chat_template"})
        (tmp_path / name).write_text(fields)
    text = HFTextTokenizer(str(tmp_path))
    assert text.chat_template == DEFAULT_CHAT_TEMPLATE
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    reference.chat_template = DEFAULT_CHAT_TEMPLATE
    vocab = Vocab.build(text.vocab_size, 64, "viq-x", text.fingerprint)
    document = chat_document(text, vocab, [], [{**t, "value": t["value"].replace("<image>", "")} for t in CHAT], 16)
    messages = chat_messages("")
    ids = reference.apply_chat_template(messages, return_dict=True)["input_ids"]
    assert document.tokens.tolist() == ids
    assert {i for i, target in enumerate(targets_of(document)) if target} == answer_positions(reference, messages, ids)


def test_inputs_embeds_sums_each_run_of_codes_slot_by_slot():
    """Hand-built: positions and slots of ``text, 4 codes, text, 8 codes, text`` at four codes per position."""
    from viq_mllm.hf import _positions

    is_code = [False] + [True] * 4 + [False] + [True] * 8 + [False]
    position, slot = _positions(is_code, 4)
    assert position.tolist() == [0, 1, 1, 1, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5]
    assert slot.tolist() == [-1, 0, 1, 2, 3, -1, 0, 1, 2, 3, 0, 1, 2, 3, -1]
    with pytest.raises(ValueError, match="not a whole number of 4-code positions"):
        _positions([False, True, True, True, False], 4)


@pytest.mark.e2e
def test_eval_scores_the_checkpoint_and_its_export_alike(trained, tmp_path):
    """``viq-mllm eval`` on easy-VQA questions: the megatron checkpoint and its HF export give the same answers."""
    import json

    ckpt, folder = trained[16]
    for source, path in (("--checkpoint", ckpt), ("--hf", folder)):
        viq_mllm("eval", source, str(path), "--task", "easy-vqa", "--limit", "4", "--out", str(tmp_path / f"{source}.json"))
    ours, theirs = (json.loads((tmp_path / f"{s}.json").read_text()) for s in ("--checkpoint", "--hf"))
    assert ours["count"] == theirs["count"] == 4
    assert [p["predicted"] for p in ours["predictions"]] == [p["predicted"] for p in theirs["predictions"]]


@pytest.mark.e2e
def test_lmms_eval_resolves_the_adapter_which_answers_and_scores_as_the_checkpoint(trained, vlm_assets):
    """lmms-eval's registry finds ``viq_mllm`` through the entry point; its requests (built as lmms-eval builds
    them) get the megatron checkpoint's greedy answers and log-likelihoods (its caption loss on the same ids)."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model
    from PIL import Image

    from megatron_ext.training.parallel import shutdown
    from megatron_ext.vlm.inference import answerer, caption_losses, load_for_inference
    from viq_mllm.data.chat import prompt_document
    from viq_mllm.data.layout import Document
    from viq_mllm.data.shards import CodeShards
    from viq_mllm.lmms_adapter import ViQMLLM

    ckpt, folder = trained[16]
    assert get_model("viq_mllm") is ViQMLLM
    lm = ViQMLLM.create_from_arg_string(f"pretrained={folder},max_new_tokens=6", {"batch_size": 1, "device": None})
    samples = list(CodeShards(vlm_assets["shards"]))[:2]
    docs = [{"image": Image.open(s.images[0].path), "caption": s.text["caption"]} for s in samples]
    lm.task_dict = {"toy": {"test": docs}}
    visual = lambda doc: [doc["image"]]  # noqa: E731 (lmms-eval's doc_to_visual)
    asked = "<image>\nWhat is in this picture?"

    def request(kind, i, second):
        return Instance(kind, (asked, second, visual, i, "toy", "test"), i,
                        metadata={"task": "toy", "doc_id": i, "repeats": 1})

    answers = lm.generate_until([request("generate_until", i, {"until": ["\n"]}) for i in range(2)])
    scores = lm.loglikelihood([request("loglikelihood", i, d["caption"]) for i, d in enumerate(docs)])
    try:
        vlm, tokenizer, meta = load_for_inference(ckpt)
        answer = answerer(vlm, tokenizer, meta.vocab.viq_dir, 16, max_new_tokens=6)
        expected = [answer(s.images[0].path, "What is in this picture?").split("\n")[0] for s in samples]
        losses = []
        for s, d in zip(samples, docs):
            prompt = prompt_document(tokenizer.text, tokenizer.vocab, s.codes, "What is in this picture?", 16)
            target = torch.tensor(tokenizer.text.encode(d["caption"]))
            mask = torch.cat([torch.zeros(len(prompt) - 1), torch.ones(len(target)), torch.zeros(1)])
            doc = Document(torch.cat([prompt.tokens, target]), torch.cat([prompt.visual, torch.zeros_like(target,
                           dtype=torch.bool)]), prompt.codes, mask)
            losses.append(caption_losses(vlm, [doc])[0] * len(target))
    finally:
        shutdown()
    assert answers == expected
    for (logprob, _), loss in zip(scores, losses):
        assert abs(logprob + loss) < 1e-3 * loss
    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round([])
