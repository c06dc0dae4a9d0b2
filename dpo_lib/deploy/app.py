"""A chat app over a GGUF model: Gradio's chat interface on llama.cpp, ready for a Hugging Face Space.

Locally: ``dpo-app MODEL.gguf`` (then open http://127.0.0.1:7860). In a Space
folder written by ``dpo-export RUN_DIR --space`` this file is ``app.py``, next to
the GGUF, and the Space starts it with ``python app.py``; it needs only ``gradio`` and
``llama-cpp-python`` (no dpo_lib), like the seed project's Space on 2 vCPUs.

The model file: the command-line argument, else ``$MODEL_PATH``, else the only ``*.gguf`` beside
this file. Answers are streamed; the GGUF's chat template formats the conversation.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

#: Besides EOS, an answer ends where the model starts the next human turn (hh-rlhf format).
STOP = ["\n\nHuman:"]
EXAMPLES = ["What is the capital of France?", "How do I bake a simple loaf of bread?",
            "What is 12 plus 30?"]


def find_model(path: str | None = None) -> Path:
    """The GGUF to serve (see the module docstring), or a clear error."""
    if path or os.environ.get("MODEL_PATH"):
        model = Path(path or os.environ["MODEL_PATH"])
        if not model.is_file():
            raise FileNotFoundError(f"no GGUF file at {model}")
        return model
    found = sorted(Path(__file__).resolve().parent.glob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError("name the GGUF file to serve (argument or $MODEL_PATH): found "
                                f"{len(found)} .gguf files beside {Path(__file__).name}")
    return found[0]


def _text(content) -> str:
    """Message content as text (Gradio may pass a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text(part.get("text", "")) if isinstance(part, dict) else str(part)
                        for part in content)
    return str(content)


def build_demo(model_path, max_tokens: int = 160, n_ctx: int = 2048):
    """The Gradio ``ChatInterface`` over ``model_path`` (loaded once, on every available core)."""
    import gradio as gr
    from llama_cpp import Llama

    from .llama_runtime import cpu_threads

    llm = Llama(str(model_path), n_ctx=n_ctx, n_threads=cpu_threads(),
                verbose=False)

    def respond(message, history):
        messages = [{"role": turn["role"], "content": _text(turn["content"])}
                    for turn in history if turn.get("role") in ("user", "assistant")]
        messages.append({"role": "user", "content": _text(message)})
        answer = ""
        for chunk in llm.create_chat_completion(messages=messages, max_tokens=max_tokens,
                                                temperature=0.0, stop=STOP, stream=True):
            answer += chunk["choices"][0]["delta"].get("content") or ""
            yield answer.strip()

    return gr.ChatInterface(
        respond, title="dpo-quant chat",
        description=f"`{Path(model_path).name}` on llama.cpp (CPU), answers streamed. "
                    "A small model fine-tuned with DPO/IPO in the dpo-quant tutorial.",
        examples=EXAMPLES, cache_examples=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-app",
                                     description="Serve a GGUF model as a Gradio chat app.")
    parser.add_argument("model", nargs="?", help="the .gguf file (default: $MODEL_PATH or the "
                                                 "only .gguf beside app.py)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args(argv)
    try:
        model = find_model(args.model)
    except FileNotFoundError as error:     # one line, as dpo_lib.core.cli does (this file stands alone)
        print(f"dpo-app: error: {error}", file=sys.stderr)
        return 1
    print(f"serving {model} on http://{args.host}:{args.port}", flush=True)
    build_demo(model).queue().launch(server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
