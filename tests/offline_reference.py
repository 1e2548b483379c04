"""vLLM's offline `LLM.generate` on the demo model: the reference every served path must match.

Run as a subprocess (vLLM spawns workers: needs the __main__ guard); prints JSON to stdout. With an adapter
directory (a 4th argument) the engine has LoRA on with the served engine's LoRA flags, and a second line
gives the same prompts through that adapter (the same `LoRARequest` the server builds).
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    # The engine core in this process (no extra spawn: ~13 s less); measured to give the same tokens.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    model_dir, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    adapter = sys.argv[4] if len(sys.argv) > 4 else None
    lora = {"enable_lora": True, "max_lora_rank": int(sys.argv[5])} if adapter else {}
    # The served engine's defaults (dtype, context), so greedy outputs can be compared token for token;
    # an explicit KV cache size, since vLLM's CPU default reserves most of the machine's memory.
    llm = LLM(model=model_dir, kv_cache_memory_bytes=256 * 1024 * 1024, disable_log_stats=True, **lora)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)

    def run(lora_request: LoRARequest | None) -> list[dict[str, object]]:
        outs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora_request)
        return [{"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids)} for o in outs]

    print("REFERENCE " + json.dumps(run(None)))
    if adapter:
        print("ADAPTER_REFERENCE " + json.dumps(run(LoRARequest("demo-lora", 1, adapter))))
