# Hooks of the local `slmsearch_wikitext` task: lm-eval's own, so the local task scores exactly
# like lm-eval's `wikitext` task (detokenizer, word/byte counts of the original page).
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

__all__ = ["process_results", "wikitext_detokenizer"]
