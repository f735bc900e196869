"""Program search over specs: mutations, tasks, regularized evolution, reports (``optgen search``).

Built on the public front end (parser, checker, ``optgen.compile_checked``, ``optgen.load``);
nothing in the compiler imports it. docs/search.md explains the method and the task protocol.
"""

from optgen.search.budget import Budget, parse_budget
from optgen.search.mutate import Mutant, mutate
from optgen.search.run import search
from optgen.search.tasks import BUILTIN, Task, load_task

__all__ = ["BUILTIN", "Budget", "Mutant", "Task", "load_task", "mutate", "parse_budget", "search"]
