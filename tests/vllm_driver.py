"""Runs in the vLLM virtual environment (tests/test_vllm.py starts it): offline `LLM(...).generate`
with greedy decoding and log-probs for a list of prompts, one engine per run in the spec.

    .venv-vllm/bin/python tests/vllm_driver.py SPEC.json OUT.json

SPEC: {"model": PATH, "prompts": [...], "max_tokens": N, "logprobs": K,
       "runs": {name: {"dtype": ..., "hf_overrides": {...}, other LLM(...) arguments}}}
OUT:  {name: {"results": [{"prompt_token_ids", "token_ids", "first_logprobs": {id: logprob}}], "seconds"}}
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def run(model: str, prompts: list, max_tokens: int, logprobs: int, options: dict) -> dict:
    from vllm import LLM, SamplingParams
    start = time.time()
    llm = LLM(model=model, enforce_eager=True, seed=0, **options)
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=logprobs, ignore_eos=True)
    outputs = llm.generate(prompts, sampling)
    results = []
    for o in outputs:
        c = o.outputs[0]
        results.append({"prompt_token_ids": list(o.prompt_token_ids), "token_ids": list(c.token_ids),
                        "first_logprobs": {str(i): lp.logprob for i, lp in c.logprobs[0].items()}})
    seconds = time.time() - start
    llm.llm_engine.engine_core.shutdown()
    del llm
    return {"results": results, "seconds": seconds}


if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    out = {name: run(spec["model"], spec["prompts"], spec["max_tokens"], spec["logprobs"], options)
           for name, options in spec["runs"].items()}
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)
