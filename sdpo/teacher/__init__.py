"""The self-teacher: reprompt construction and rendering (pure) and the teacher weights that score it."""

from sdpo.teacher.reprompt import (
    Reprompt,
    RepromptStats,
    build_reprompts,
    fit_bodies,
    group_reprompts,
    reprompt_stats,
    strip_thinking,
    teacher_prompt_ids,
)
from sdpo.teacher.teacher import TEACHER_KINDS, InitialWeights, Teacher, TeacherFeatures, eval_mode

__all__ = [
    "TEACHER_KINDS",
    "InitialWeights",
    "Reprompt",
    "RepromptStats",
    "Teacher",
    "TeacherFeatures",
    "build_reprompts",
    "eval_mode",
    "fit_bodies",
    "group_reprompts",
    "reprompt_stats",
    "strip_thinking",
    "teacher_prompt_ids",
]
