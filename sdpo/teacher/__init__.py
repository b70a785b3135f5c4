"""The teacher: reprompt construction and rendering (pure), where its weights come from (`weights`: the policy's
own; `external`: a model of its own), and how they score (`teacher`)."""

from sdpo.teacher.choices import (
    DATA_CONTEXT_ORDERS,
    TEACHER_CONTEXTS,
    TEACHER_KINDS,
    TEACHER_SCORERS,
    WEIGHT_SOURCES,
    TeacherScorer,
)
from sdpo.teacher.external import ExternalWeights, TeacherRouter
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
from sdpo.teacher.teacher import (
    NoTeacher,
    Teacher,
    TeacherContext,
    TeacherFeatures,
    TeacherLike,
    TeacherTargets,
    build_teacher,
    reprompt_limit,
    reprompt_window,
)
from sdpo.teacher.weights import EMAWeights, InitialWeights, LiveWeights, eval_mode, frozen_copy

__all__ = [
    "DATA_CONTEXT_ORDERS",
    "TEACHER_CONTEXTS",
    "TEACHER_KINDS",
    "TEACHER_SCORERS",
    "WEIGHT_SOURCES",
    "EMAWeights",
    "ExternalWeights",
    "InitialWeights",
    "LiveWeights",
    "NoTeacher",
    "Reprompt",
    "RepromptStats",
    "Teacher",
    "TeacherContext",
    "TeacherFeatures",
    "TeacherLike",
    "TeacherRouter",
    "TeacherScorer",
    "TeacherTargets",
    "build_reprompts",
    "build_teacher",
    "eval_mode",
    "fit_bodies",
    "frozen_copy",
    "group_reprompts",
    "reprompt_limit",
    "reprompt_stats",
    "reprompt_window",
    "strip_thinking",
    "teacher_prompt_ids",
]
