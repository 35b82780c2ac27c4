"""Every data source a config's `datasets:` can name, with its options and its load (the contract: common.py).

Adding a source is one module of this package and one line of `SOURCES`; docs/architecture.md, "Add a data source",
has the steps. Nothing else in the project names a source.
"""

from __future__ import annotations

from model_training.data.sources import (
    alpaca,
    chat_jsonl,
    dolly15k,
    hh_rlhf,
    natural_instructions,
    oasst1,
    oasst_export,
    preference_jsonl,
    text,
)
from model_training.data.sources.common import Source

SOURCES: dict[str, Source] = {
    "oasst_export": Source(oasst_export.OasstExportConfig, oasst_export.load, hub=False, compare=oasst_export.compare),
    "oasst1": Source(oasst1.Oasst1Config, oasst1.load, compare=oasst1.compare),
    "dolly15k": Source(dolly15k.Dolly15kConfig, dolly15k.load, rows=dolly15k.convert_row),
    "alpaca": Source(alpaca.AlpacaConfig, alpaca.load, rows=alpaca.convert_row),
    "hh_rlhf": Source(hh_rlhf.HhRlhfConfig, hh_rlhf.load, compare=hh_rlhf.compare, rows=hh_rlhf.convert_row),
    "preference_jsonl": Source(preference_jsonl.PreferenceJsonlConfig, None, compare=preference_jsonl.compare),
    "chat_jsonl": Source(chat_jsonl.ChatJsonlConfig, chat_jsonl.load, rows=chat_jsonl.convert_row,
                         keeps=chat_jsonl.language_filter),
    "text": Source(text.TextConfig, text.load, rows=text.convert_row, documents=True),
    "natural_instructions": Source(natural_instructions.NaturalInstructionsConfig, natural_instructions.load),
}
"""Dataset name -> its options schema and load, in the order error messages list the names."""
