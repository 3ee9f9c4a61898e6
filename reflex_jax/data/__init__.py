"""Data: prepare text (HF hub, local files, built-in tasks) into token files, and load batches from them.

    python -m reflex_jax.data prepare --source <hub id | files | dir>
        --tokenizer <hub id | dir | bytes> --out DIR
    python -m reflex_jax.data task --task mix --out DIR          # a built-in task (data/tasks.py)
    python -m reflex_jax.data info DIR

The modules, in the order data flows through them:
    templates   Template (a row's text, the answer last), DEFAULT_TEMPLATE, render_prompt,
                prompt_tokens (bos + the template up to the answer: how a question is asked)
    sources     resolving a source; rows of .jsonl/.json/.parquet/.csv/.txt files and hub datasets
    tokenizer   `bytes` or an HF tokenizer behind one small interface
    encode      tokenising rendered rows and marking their answer tokens
    writer      the split stream writer, copying rows, publishing a finished directory; failed writes
    existing    reusing the same preparation in an output directory, refusing to replace another
    prepare     prepare() and prepare_task()
    tasks       the built-in synthetic tasks
    store       the format on disk (see its docstring) and TokenData, which opens it
    verify      check_token_range (ids against a model's vocab), data_fingerprint (for runs)
    windows     where training windows start (inside long rows too) and what they reach
    documents   the documents inside a packed window: segment ids and per-document positions
    loader      BatchLoader (training windows) and val_batches
The command line lives in reflex_jax/cli/data.py. Importing this package loads numpy only:
tokenizers, transformers, datasets, pyarrow and tqdm are imported where they are used.
"""
from .checks import LONG_ROWS
from .documents import document_starts, packed_documents, window_documents
from .encode import token_dtype
from .loader import BatchLoader, val_batches
from .prepare import prepare, prepare_task
from .sources import DEFAULT_SOURCE, ROW_SUFFIXES
from .store import FORMAT_VERSION, TokenData, read_data_meta, task_val_rows
from .tasks import TASK_VERSION, TASKS, Task, get_task
from .templates import DEFAULT_TEMPLATE, Template, prompt_tokens, render_prompt
from .tokenizer import DEFAULT_TOKENIZER, ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer
from .verify import check_token_range, data_fingerprint
from .windows import reach_summary, train_starts, window_reach

__all__ = [
    "BatchLoader", "ByteTokenizer", "DEFAULT_SOURCE", "DEFAULT_TEMPLATE", "DEFAULT_TOKENIZER",
    "FORMAT_VERSION", "HFTokenizer", "LONG_ROWS", "ROW_SUFFIXES", "TASKS", "TASK_VERSION", "Task",
    "Template", "TokenData", "TokenizerError", "check_token_range", "data_fingerprint",
    "document_starts", "get_task", "packed_documents", "window_documents",
    "load_tokenizer", "prepare", "prepare_task", "prompt_tokens", "reach_summary", "read_data_meta",
    "render_prompt", "task_val_rows", "token_dtype", "train_starts", "val_batches", "window_reach",
]
