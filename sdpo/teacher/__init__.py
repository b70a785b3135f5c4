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
from sdpo.teacher.choices import DATA_CONTEXT_ORDERS, TEACHER_KINDS, TEACHER_SCORERS, WEIGHT_SOURCES, TeacherScorer
from sdpo.teacher.teacher import (
    InitialWeights,
    NoTeacher,
    Teacher,
    TeacherFeatures,
    build_teacher,
    eval_mode,
    reprompt_limit,
)

__all__ = [
    "DATA_CONTEXT_ORDERS",
    "TEACHER_KINDS",
    "TEACHER_SCORERS",
    "InitialWeights",
    "NoTeacher",
    "Reprompt",
    "RepromptStats",
    "Teacher",
    "TeacherFeatures",
    "TeacherScorer",
    "WEIGHT_SOURCES",
    "build_reprompts",
    "build_teacher",
    "eval_mode",
    "fit_bodies",
    "group_reprompts",
    "reprompt_limit",
    "reprompt_stats",
    "strip_thinking",
    "teacher_prompt_ids",
]
