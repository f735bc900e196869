"""The error catalog: every diagnostic optgen reports has a stable code listed here.

A code never changes meaning once released; ``docs/errors.md`` explains each one with
an example that triggers it and the fix (``tests/test_catalog.py`` runs every example
and checks that each code is raised somewhere and documented). ``E0xx`` are files and
the command line, ``E1xx`` syntax, ``E2xx`` the checker, ``E3xx`` values given at
run time (hyperparameters, parameter trees, artifacts, saved state); ``W`` codes are
warnings. To report a new mistake: add a line here, a section to docs/errors.md, and
pass ``code="E2xx"`` where the error is raised.
"""

from __future__ import annotations

CATALOG: dict[str, str] = {
    # Files and the command line
    "E001": "no built-in spec or file by that name",
    "E002": "the spec path is a directory",
    "E003": "the spec file does not exist",
    "E004": "the spec file cannot be read",
    "E005": "the spec file is not UTF-8 text",
    "E006": "the output folder does not exist",
    "E007": "the output file cannot be written",
    "E008": "the spec is too large",
    "E009": "--with is not NAME=VALUE",
    "E010": "unknown platform",
    "E011": "--emit artifact needs -o",
    "E012": "--emit hlo needs a concrete shape",
    "E013": "unknown pass",
    "E014": "a malformed --shape",
    # Syntax
    "E101": "unexpected character",
    "E102": "unexpected token",
    "E103": "unexpected end of file",
    "E104": "indentation matches no enclosing block",
    "E105": "more than one update block",
    "E106": "nested too deeply",
    "E107": "malformed hyperparameter range",
    # The checker
    "E201": "no update block",
    "E202": "the update never assigns p",
    "E203": "a state is never updated",
    "E204": "a reserved name is declared",
    "E205": "a name is declared twice",
    "E206": "unknown storage dtype",
    "E207": "assignment to g or t",
    "E208": "assignment to a hyperparameter or option",
    "E209": "unknown name",
    "E210": "an if tests something other than options",
    "E211": "a condition where a number belongs",
    "E212": "a number where a condition belongs",
    "E213": "an option used outside an if",
    "E214": "unknown function",
    "E215": "wrong number of arguments",
    "E216": "a reduction of a per-step or per-leaf value",
    "E217": "a hyperparameter default outside its declared range",
    "E218": "division by a constant zero",
    "E219": "a state given two shapes or two dtypes",
    "E220": "a value with more copies than its state holds",
    "E221": "row or column values without the factoring options",
    "E222": "a numeric option tested by if",
    "E230": "values of different matrix shapes combined",
    "E231": "a matrix product or transpose that does not fit",
    "E233": "a name that is a different matrix in the two branches of an if",
    "E234": "a repeat count that is not a positive whole number fixed at compile time",
    "E235": "a per-step state assigned under an if on shapes",
    # Values given at run time
    "E301": "update called without params",
    "E302": "unknown hyperparameter or option",
    "E303": "unknown option",
    "E304": "an option that is not true or false",
    "E305": "a hyperparameter that is not a number or a schedule",
    "E306": "a hyperparameter outside its declared range",
    "E307": "a tree whose structure differs from the parameters'",
    "E308": "a leaf whose shape differs from its parameter's",
    "E309": "a leaf whose dtype differs from what is expected",
    "E310": "a leaf that is not an array",
    "E311": "state from another optimizer",
    "E312": "a numeric option given something other than a number",
    "E320": "unknown artifact input",
    "E321": "missing artifact input",
    "E322": "the artifact cannot be read",
    "E323": "not an optgen artifact",
    "E324": "the artifact is damaged",
    "E325": "artifact inputs of another shape or dtype",
    "E330": "the saved state cannot be read",
    "E331": "not an optgen state file, or another format version",
    "E332": "the saved state is truncated or altered",
    "E333": "the saved state is from another spec",
    "E334": "the saved state is for other parameters",
    "E340": "more than one clip",
    "E341": "EMA settings without use_ema",
    "E342": "an option every spec takes, given a value it does not take",
    "E343": "a weight-decay mask on a spec without weight_decay",
    "E344": "a mask that does not fit the parameters",
    "E345": "an option adds a name the spec already has",
    "E346": "unknown schedule",
    "E347": "a schedule's arguments do not fit it",
    "E348": "get_config of a value that cannot be written down",
    "E349": "the config's spec file has changed",
    "E360": "a matrix op reached a parameter that is not a matrix",
    # Warnings
    "W201": "sqrt, rsqrt or log of a value that can be negative",
    "W202": "a value that can be negative to a fractional power",
}
