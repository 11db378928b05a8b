"""The teacher side of a run: the live frozen teacher, the teacher-output cache, and their shared interface.

``cache_writer`` (``vanillakd cache-teacher``) is not imported here: it drives a training stream (``train``)."""
from .base import Teacher
from .cache import CachedTeacher, open_cache, stream_description, teacher_description
from .live import FrozenTeacher, check_teacher_name, create_teacher, resize_batch, teacher_input_adapter

__all__ = ["Teacher", "CachedTeacher", "open_cache", "stream_description", "teacher_description", "FrozenTeacher",
           "check_teacher_name", "create_teacher", "resize_batch", "teacher_input_adapter"]
