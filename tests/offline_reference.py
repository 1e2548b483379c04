"""vLLM's offline `LLM.generate` on the demo model: the reference every served path must match.

Run as a subprocess (vLLM spawns workers: needs the __main__ guard); prints JSON to stdout.
"""

from __future__ import annotations

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    model_dir, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    llm = LLM(model=model_dir, max_model_len=1024, dtype="float32", disable_log_stats=True)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    result = [{"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids)} for o in outs]
    print("REFERENCE " + json.dumps(result))
