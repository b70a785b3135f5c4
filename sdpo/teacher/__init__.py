"""The self-teacher: reprompt construction (pure, string level) and the teacher weights that score it."""

from sdpo.teacher.reprompt import Reprompt, RepromptStats, build_reprompts, fit_bodies, reprompt_stats, strip_thinking
from sdpo.teacher.teacher import Teacher, TeacherHidden, eval_mode, teacher_prompt_ids

__all__ = [
    "Reprompt",
    "RepromptStats",
    "Teacher",
    "TeacherHidden",
    "build_reprompts",
    "eval_mode",
    "fit_bodies",
    "reprompt_stats",
    "strip_thinking",
    "teacher_prompt_ids",
]
