"""vLLM's offline `LLM.generate` on the demo model: the reference every served path must match.

Run as a subprocess (vLLM spawns workers: needs the __main__ guard); prints JSON to stdout.
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    # The engine core in this process (no extra spawn: ~13 s less); measured to give the same tokens.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    model_dir, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    # The served engine's defaults (dtype, context), so greedy outputs can be compared token for token;
    # an explicit KV cache size, since vLLM's CPU default reserves most of the machine's memory.
    llm = LLM(model=model_dir, kv_cache_memory_bytes=256 * 1024 * 1024, disable_log_stats=True)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    result = [{"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids)} for o in outs]
    print("REFERENCE " + json.dumps(result))
