"""Hugging Face folder → quantised Hugging Face folder, with its report: the cost in quality, the gain in size and speed.

    python launch/compress.py compress.model_path=outputs/export/dev1 compress=int8 compress.output_dir=outputs/compressed/dev1-int8

torchao does the work, through transformers' `TorchAoConfig`: the source folder is loaded with that
quantization_config, which gives every `torch.nn.Linear` but the output embedding a torchao weight
(int8 values and their scales), and `save_pretrained` writes it as safetensors (torchao's tensors
flattened into plain ones, described in the file's metadata; no pickle). The folder then loads with
`AutoModelForCausalLM.from_pretrained` as any other and is served unchanged by launch/serve.py.

Methods (`compress.method`; one preset each in conf/compress/):
    int8_weight_only  int8 weights, one scale per output row (or per `compress.group_size` inputs);
                      activations stay in compress.dtype
    int8_dynamic      int8 weights per row, and every activation quantised to int8 per token as it runs
    int4_weight_only  int4 weights per `compress.group_size` inputs: torchao 0.18's only int4 kernel for
                      a CUDA or CPU build of torch is CUDA's (tinygemm, bf16), so it needs compress.device=cuda

The report (`compress_report.json` in the folder, and a table printed) puts the folder beside its source:
the weights' size on disk; validation perplexity on the prepared shards' evaluation set (the one training
reports: framework/evaluate.py); greedy agreement on a fixed prompt set; decode tokens/s of one greedy batch
through transformers' generate (the same prompts and threads for both). A method whose
perplexity rises past `compress.max_ppl_increase` (a ratio) fails in one line naming the figures.

The folder follows export's rules (framework/export.py): written beside `output_dir`, moved into place only
once it has passed the gate; an existing output_dir is replaced only when it holds an earlier compression
(its compress_report.json, which is this stage's marker), so nothing of the user's is ever deleted.
"""
