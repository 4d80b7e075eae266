"""Evaluators: exact / token accuracy (``trm.eval.metrics``) and ARC voting with pass@k and the
ARC Prize submission file (``trm.eval.arc_vote``)."""

from trm.eval.arc_vote import ArcEvalSet, ArcVoter, SubmissionError, validate_submission
from trm.eval.metrics import accuracy_counts

__all__ = ["ArcEvalSet", "ArcVoter", "SubmissionError", "accuracy_counts", "validate_submission"]
