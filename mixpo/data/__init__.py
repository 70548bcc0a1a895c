"""Data: built-in procedural tasks, the char tokenizer, JSONL/Parquet readers, guide traces."""

from mixpo.data.arithmetic import AdditionTask, exact_integer_reward
from mixpo.data.readers import DataError, ReadSummary, read_examples
from mixpo.data.rg_tasks import ReasoningGymReward, ReasoningGymTask
from mixpo.data.tasks import Example, Task, get_task, register_task, reward_columns, split_of
from mixpo.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, char_tokenizer
from mixpo.data.traces import Trace, read_traces, write_traces

__all__ = [
    "AdditionTask", "BOS_ID", "DataError", "EOS_ID", "Example", "PAD_ID", "ReadSummary",
    "ReasoningGymReward", "ReasoningGymTask", "Task", "Trace", "UNK_ID", "char_tokenizer",
    "exact_integer_reward", "get_task", "read_examples", "read_traces", "register_task",
    "reward_columns", "split_of", "write_traces",
]
