"""The selector: a candidate's quality and modality verdicts (``model.py``) and its training (``training.py``).

``from optim.selector import Selector`` is the README's import; the rest lives in the two files."""

from optim.selector.model import Selector, SelectorLoadError

__all__ = ["Selector", "SelectorLoadError"]
