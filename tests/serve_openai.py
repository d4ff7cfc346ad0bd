"""Drive `stancemix serve` with the official `openai` package; print what it saw as JSON.

Usage: python3 tests/serve_openai.py BASE_URL PROMPT MAX_TOKENS
Run by tests/serve.rs (with PYTHONPATH=target/pydeps, where scripts/test installs `openai`);
the Rust test compares the answers with `stancemix generate`'s.
"""

import json
import sys

import openai
from openai import OpenAI


def main() -> None:
    base_url, prompt, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    client = OpenAI(base_url=base_url, api_key="not-needed", max_retries=0)
    out = {"models": [m.id for m in client.models.list()]}
    messages = [{"role": "user", "content": prompt}]
    for dial in ["1", "-1"]:
        # The blend in the model name.
        r = client.chat.completions.create(
            model=f"stancemix:dial={dial}",
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            seed=7,
        )
        out[f"chat{dial}"] = r.choices[0].message.content
        out[f"chat_ext{dial}"] = (r.model_extra or {}).get("stancemix")
        out[f"usage{dial}"] = r.usage.completion_tokens
        # The blend in the extension field (which wins over the plain model name), streamed.
        stream = client.chat.completions.create(
            model="stancemix",
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            seed=7,
            stream=True,
            extra_body={"stancemix": {"blend": f"dial={dial}"}},
        )
        text, first_ext, finish = "", None, None
        for i, chunk in enumerate(stream):
            if i == 0:
                first_ext = (chunk.model_extra or {}).get("stancemix")
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        out[f"stream{dial}"] = text
        out[f"stream_ext{dial}"] = first_ext
        out[f"stream_finish{dial}"] = finish
    try:
        client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=4)
        out["unknown_model"] = None
    except openai.APIStatusError as e:
        out["unknown_model"] = {"status": e.status_code, "body": e.body}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
