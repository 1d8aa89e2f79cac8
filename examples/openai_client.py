"""One OpenAI-compatible completion against a running server (`--oscar` or not).

    python examples/openai_client.py --url http://127.0.0.1:30000
"""

import argparse

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--prompt", default="The three most important things about a 2-bit KV cache are")
    args = p.parse_args()
    client = OpenAI(base_url=f"{args.url}/v1", api_key="none")
    model = client.models.list().data[0].id
    out = client.completions.create(model=model, prompt=args.prompt, max_tokens=32, temperature=0)
    print(out.choices[0].text)


if __name__ == "__main__":
    main()
