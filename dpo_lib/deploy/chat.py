"""Chat with an exported GGUF model in the terminal, tokens streamed as llama.cpp makes them.

``dpo-chat MODEL.gguf`` (an empty line or Ctrl-D ends the chat), or one question:
``dpo-chat MODEL.gguf --prompt "How do I bake bread?"``. The model's own chat
template (from the GGUF header) formats the conversation; exports of this project carry the
hh-rlhf dialogue format they were trained on (:data:`dpo_lib.deploy.export.HH_CHAT_TEMPLATE`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

from ..core.cli import command
from ..core.data import HUMAN
from ..core.errors import MissingFileError

#: Besides EOS, an answer ends where the model starts the next human turn.
STOP = [HUMAN]


def load_chat_model(path, n_ctx: int = 1024):
    """``llama_cpp.Llama`` for chatting (quiet, every available core), with a context of
    ``n_ctx`` tokens or the model's trained context where that is shorter."""
    from .llama_runtime import gguf_metadata
    from .gguf_check import open_gguf

    if not Path(path).is_file():
        raise MissingFileError(f"no GGUF file at {path}")
    meta = gguf_metadata(path)
    trained = meta.get(f"{meta.get('general.architecture')}.context_length", n_ctx)
    return open_gguf(path, n_ctx=min(n_ctx, trained), logits_all=False)


def stream_reply(llm, messages: list[dict], max_tokens: int = 128, temperature: float = 0.0,
                 seed: int = 0) -> Iterator[str]:
    """Yield the assistant's answer to ``messages`` (``[{"role", "content"}, ...]``) piece by
    piece, formatted with the model's chat template; greedy at ``temperature`` 0."""
    stream = llm.create_chat_completion(messages=messages, max_tokens=max_tokens,
                                        temperature=temperature, seed=seed, stop=STOP, stream=True)
    started = False
    for chunk in stream:
        piece = chunk["choices"][0]["delta"].get("content") or ""
        if not started:                      # the hh format puts a space after "Assistant:"
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            yield piece


def complete(llm, prompt: str, max_tokens: int = 40) -> str:
    """Greedy continuation of a raw hh-rlhf prompt (ending in ``"\\n\\nAssistant:"``), cut at
    the next human turn: the text format the model trained on, without a chat template (and, as in
    training, without a BOS token)."""
    ids = llm.tokenize(prompt.encode(), add_bos=False)
    out = llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, stop=STOP)
    return out["choices"][0]["text"].strip()


def reply(llm, messages: list[dict], **kwargs) -> str:
    """The whole answer of :func:`stream_reply`, stripped."""
    return "".join(stream_reply(llm, messages, **kwargs)).strip()


@command("dpo-chat")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-chat",
                                     description="Chat with a GGUF model, streaming tokens.")
    parser.add_argument("model", help="a .gguf file (dpo-export makes them)")
    parser.add_argument("--prompt", help="ask one question, print the answer and exit")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--system", help="a system message to start the conversation with")
    args = parser.parse_args(argv)
    llm = load_chat_model(args.model)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    try:
        while True:
            if args.prompt is not None:
                question = args.prompt
            else:
                try:
                    question = input("you> ").strip()
                except EOFError:
                    break
                if not question:
                    break
                print("model> ", end="", flush=True)
            messages.append({"role": "user", "content": question})
            answer = []
            for piece in stream_reply(llm, messages, args.max_tokens, args.temperature):
                answer.append(piece)
                print(piece, end="", flush=True)
            print()
            messages.append({"role": "assistant", "content": "".join(answer).strip()})
            if args.prompt is not None:
                break
    finally:
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
