"""Ask a served SFT task (and the bare base) with the official `openai` client: the README's "Fine-tune and serve an
LLM" query. The prompt is the one the task was trained on (`sft_data.prompt_messages`), answered greedily.

    python examples/sft/ask.py --url http://127.0.0.1:8000/v1 --task sst2 --base out/smollm2-135m "a gripping film"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openai import OpenAI

sys.path.append(str(Path(__file__).parent))  # appended: examples/glue has a train.py too
import sft_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", help="The text to classify, e.g. a movie review for sst2.")
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="The server's OpenAI base URL.")
    parser.add_argument("--task", default="sst2", help="The served task (the adapter folder's name) and its prompt.")
    parser.add_argument("--base", required=True, help="The base's name as served (--base of bitfit-peft serve).")
    parser.add_argument("--max-tokens", type=int, default=3, help="Most tokens to generate.")
    args = parser.parse_args(argv)
    client = OpenAI(base_url=args.url, api_key="unused", max_retries=0)
    ask = sft_data.prompt_messages(sft_data.get_task(args.task).name, args.text)
    for model in (args.task, args.base):
        r = client.chat.completions.create(model=model, messages=ask, max_tokens=args.max_tokens, temperature=0)  # type: ignore[arg-type]
        print(f"{model}: {r.choices[0].message.content!r} ({r.usage.completion_tokens} tokens)")  # type: ignore[union-attr]
    stream = client.chat.completions.create(
        model=args.task, messages=ask, max_tokens=args.max_tokens, temperature=0, stream=True
    )  # type: ignore[arg-type]
    print("streamed:", repr("".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
