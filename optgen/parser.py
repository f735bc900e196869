"""Spec text -> AST (:mod:`optgen.syntax`).

The grammar (``grammar.lark``) is written for lark: a well-kept parser library that
gives every token its line and column, builds an LALR(1) parser with no recursion (so
deeply nested input cannot overflow Python's stack while parsing), and has an
indentation post-lexer for ``update:`` and ``if`` blocks. The AST is built during the
parse by an inline transformer; lark's syntax errors are turned into
:class:`~optgen.diagnostics.SpecError` with a caret and a hint.
"""

from __future__ import annotations

import functools
import math
import re
from importlib import resources

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.indenter import DedentError, Indenter

from optgen import syntax as ast
from optgen.diagnostics import Source, Span, SpecError, did_you_mean

# real specs are about 1 KB; this bounds parse time (~0.1 ms a token) and memory
MAX_SPEC_CHARS = 1 << 17
MAX_DEPTH = 100  # nesting of expressions and blocks; the checker and lowering recurse this deep


def parse(text: str, filename: str = "<spec>") -> ast.Spec:
    """Parse spec ``text``; ``filename`` is the name used in diagnostics and MLIR locations."""
    source = Source(text, filename)
    if len(text) > MAX_SPEC_CHARS:
        raise SpecError(
            f"the spec is {len(text):,} characters long; the limit is {MAX_SPEC_CHARS:,}",
            source,
            hint="an optimizer spec is a page of text: is this the right file?",
            code="E008",
        )
    padded = text if text.endswith("\n") else text + "\n"
    try:
        spec = ast.Spec(**_parser().parse(padded), source=source)
        _check_depth(spec)
        return spec
    except _LocatedError as err:
        raise SpecError(str(err), source, err.span, err.hint, code=err.code) from None
    except UnexpectedInput as err:
        raise _syntax_error(err, source) from None


def _span(tok: Token) -> Span:
    return Span(tok.line, tok.column, tok.end_line, tok.end_column)


class _LocatedError(Exception):
    """A mistake found inside the parse, where the Source is not at hand; parse() adds it."""

    def __init__(self, message: str, span: Span, hint: str, *, code: str):
        super().__init__(message)
        self.span, self.hint, self.code = span, hint, code


class _SpecIndenter(Indenter):
    NL_type = "_NL"
    OPEN_PAREN_types = ["LPAR", "LSQB"]  # a range may open with '[' and close with ')'
    CLOSE_PAREN_types = ["RPAR", "RSQB"]
    INDENT_type = "_INDENT"
    DEDENT_type = "_DEDENT"
    tab_len = 8

    def process(self, stream):
        self.widths = [(0, 0)]  # each open block's indentation, with tabs of 8 and of 1 columns
        return super().process(stream)

    def handle_NL(self, token):
        if self.paren_level == 0:
            self.check_tabs(token)
        try:
            yield from super().handle_NL(token)
        except DedentError:
            indent = len(token.rsplit("\n", 1)[1])
            line = token.end_line
            raise _LocatedError(
                "this line's indentation matches no enclosing block",
                Span(line, 1, line, indent + 2),
                "indent each block's statements by the same amount",
                code="E104",
            ) from None

    def check_tabs(self, token) -> None:
        """Refuse tabs and spaces mixed so that the block a line is in depends on the tab width
        (Python's rule): the line must compare to every open block alike with tabs of 8 and of 1."""
        indent = token.rsplit("\n", 1)[1]
        w8, w1 = len(indent) + 7 * indent.count("\t"), len(indent)
        if any((w8 > a8, w8 == a8) != (w1 > a1, w1 == a1) for a8, a1 in self.widths):
            line = token.end_line
            raise _LocatedError(
                "this line's indentation mixes tabs and spaces, so which block it is in depends "
                "on the tab width",
                Span(line, 1, line, len(indent) + 1),
                "indent with spaces only (or with tabs only)",
                code="E108",
            )
        while self.widths[-1][0] > w8:
            self.widths.pop()
        if w8 > self.widths[-1][0]:
            self.widths.append((w8, w1))


def _check_depth(spec: ast.Spec) -> None:
    """Refuse nesting deeper than MAX_DEPTH, found without recursion, at the first node past it."""
    stack = [
        (node, 1)
        for node in (*spec.body, *(s.init for s in spec.states), *(o.value for o in spec.outputs))
    ]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _LocatedError(
                f"this is nested more than {MAX_DEPTH} levels deep",
                node.span,
                "name parts of the expression with assignments",
                code="E106",
            )
        if isinstance(node, ast.Assign):
            stack.append((node.value, depth))
        elif isinstance(node, ast.If):
            stack.extend((child, depth + 1) for child in (node.cond, *node.then, *node.orelse))
        elif isinstance(node, ast.Repeat):
            stack.extend((child, depth + 1) for child in node.body)
        elif isinstance(node, ast.Unary):
            stack.append((node.operand, depth + 1))
        elif isinstance(node, ast.Binary):
            stack.extend(((node.left, depth + 1), (node.right, depth + 1)))
        elif isinstance(node, ast.Call):
            stack.extend((arg, depth + 1) for arg in node.args)


def _float(tok: Token) -> float:
    """A number literal's float64 value; one that float64 turns into inf, or into 0, is refused."""
    value = float(tok)
    if math.isinf(value) or (value == 0 and re.search(r"[1-9]", tok.split("e")[0].split("E")[0])):
        raise _LocatedError(
            f"the number {tok} is {'too large' if value else 'too small'} for float64 (it would be "
            f"{value:g})",
            _span(tok),
            "write inf in a range bound; otherwise a number within about 1e-308 to 1.8e308",
            code="E109",
        )
    return value


def _bound_value(tok: Token) -> float:
    if tok.type == "NUMBER":
        return _float(tok)
    if tok == "inf":
        return float("inf")
    raise _LocatedError(
        f"a range bound is a number or inf, not '{tok}'",
        _span(tok),
        "for example: in [0, inf)",
        code="E107",
    )


class _ElseBlock(tuple):
    pass


@v_args(inline=True)
class _ToAst(Transformer):
    """Builds the AST bottom-up as the LALR parser reduces (no recursion)."""

    def number(self, tok):
        return ast.Number(_float(tok), _span(tok))

    def name(self, tok):
        return ast.Name(str(tok), _span(tok))

    def bool(self, tok):
        return ast.Bool(tok == "true", _span(tok))

    def signed_number(self, *toks):
        value = _float(toks[-1])
        return -value if len(toks) == 2 else value

    def unary(self, op, operand):
        return ast.Unary(str(op), operand, _span(op).to(operand.span))

    def binary(self, left, op, right):
        return ast.Binary(str(op), left, right, left.span.to(right.span))

    def call(self, func, *rest):
        *args, rpar = rest
        name = ast.Name(str(func), _span(func))
        return ast.Call(name, tuple(a for a in args if a is not None), name.span.to(_span(rpar)))

    def header(self, name, description=None):
        return ("header", ast.Name(str(name), _span(name)), (description or '""')[1:-1])

    def hyper(self, name, default, range_):
        return ast.Hyper(ast.Name(str(name), _span(name)), default, _span(name), range_)

    def bound(self, *toks):
        value = _bound_value(toks[-1])
        return (-value if len(toks) == 2 else value), _span(toks[0]).to(_span(toks[-1]))

    def range(self, keyword, open_, lo, hi, close):
        span = _span(keyword).to(_span(close))
        if keyword != "in":
            raise _LocatedError(
                f"expected 'in' before a range, got '{keyword}'",
                _span(keyword),
                "write: hyper b1 = 0.9 in [0, 1)",
                code="E107",
            )
        bounds = ast.Range(lo[0], hi[0], open_ == "(", close == ")", span)
        if not (
            bounds.lo < bounds.hi
            or (bounds.lo == bounds.hi and not bounds.lo_open and not bounds.hi_open)
        ):
            raise _LocatedError(
                f"the range {bounds} is empty",
                span,
                "write the lower bound first; '[' and ']' include a bound, '(' and ')' exclude it",
                code="E107",
            )
        return bounds

    def option(self, name, default):
        value = default.value if isinstance(default, ast.Bool) else default
        return ast.Option(ast.Name(str(name), _span(name)), value, _span(name))

    def state(self, name, *rest):
        *qualifiers, init = rest
        qualifiers = tuple(ast.Name(str(q), _span(q)) for q in qualifiers)
        return ast.State(ast.Name(str(name), _span(name)), qualifiers, init, _span(name))

    def input(self, name):
        return ast.Input(ast.Name(str(name), _span(name)), _span(name))

    def output(self, name, value):
        return ast.Output(ast.Name(str(name), _span(name)), value, _span(name))

    def assign(self, target, value):
        name = ast.Name(str(target), _span(target))
        return ast.Assign(name, value, name.span.to(value.span))

    def else_block(self, *stmts):
        return _ElseBlock(stmts)

    def if_stmt(self, if_tok, cond, *stmts):
        orelse = stmts[-1] if stmts and isinstance(stmts[-1], _ElseBlock) else _ElseBlock()
        then = stmts[: len(stmts) - (1 if orelse else 0)]
        return ast.If(cond, tuple(then), tuple(orelse), _span(if_tok).to(cond.span))

    def repeat_stmt(self, repeat_tok, count, *stmts):
        count = (
            ast.Number(float(count), _span(count))
            if count.type == "NUMBER"
            else ast.Name(str(count), _span(count))
        )
        return ast.Repeat(count, tuple(stmts), _span(repeat_tok).to(count.span))

    def update(self, tok, *stmts):
        return ("update", _span(tok), stmts)

    def start(self, *items):
        header = next(i for i in items if isinstance(i, tuple) and i[0] == "header")
        updates = [i for i in items if isinstance(i, tuple) and i[0] == "update"]
        if len(updates) > 1:
            raise _LocatedError(
                "a spec has one 'update:' block",
                updates[1][1],
                "put every statement in the first 'update:' block",
                code="E105",
            )
        body = updates[0][2] if updates else ()
        # The transformer never sees the text; parse() adds the Source.
        return dict(
            name=header[1],
            description=header[2],
            hypers=tuple(i for i in items if isinstance(i, ast.Hyper)),
            options=tuple(i for i in items if isinstance(i, ast.Option)),
            states=tuple(i for i in items if isinstance(i, ast.State)),
            outputs=tuple(i for i in items if isinstance(i, ast.Output)),
            inputs=tuple(i for i in items if isinstance(i, ast.Input)),
            body=tuple(body),
            update_span=updates[0][1] if updates else None,
        )


@functools.cache
def _parser() -> Lark:
    grammar = resources.files("optgen").joinpath("grammar.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        postlex=_SpecIndenter(),
        transformer=_ToAst(),
        maybe_placeholders=True,
    )


_DESCRIBE = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a quoted description",
    "_NL": "end of line",
    "_INDENT": "an indented block",
    "_DEDENT": "end of block",
    "$END": "end of file",
    "COMPARE": "a comparison",
    "MUL_OP": "'*', '/' or '@'",
}


def _describe(terminal: str) -> str:
    if terminal in _DESCRIBE:
        return _DESCRIBE[terminal]
    pattern = _parser().get_terminal(terminal).pattern
    return f"'{pattern.value}'" if pattern.type == "str" else terminal.lower()


def _syntax_error(err: UnexpectedInput, source: Source) -> SpecError:
    line, col = max(err.line, 1), max(err.column, 1)
    if isinstance(err, UnexpectedCharacters):
        char = source.text[err.pos_in_stream] if err.pos_in_stream < len(source.text) else "?"
        hint = (
            "write powers as a ^ b"
            if char == "*"
            else (
                "descriptions are in double quotes"
                if char == "'"
                else "names are letters, digits and '_'; operators are + - * / ^ and comparisons"
            )
        )
        return SpecError(
            f"unexpected character {char!r}",
            source,
            Span(line, col, line, col + 1),
            hint,
            code="E101",
        )
    if isinstance(err, UnexpectedToken) and err.token.type != "$END":
        tok = err.token
        got = _describe(tok.type) if tok.type.startswith("_") else f"'{tok}'"
        if tok.type == "_NL":  # report at the end of the line, not the start of the next
            line, col = tok.line, tok.column
        span = Span(
            line, col, line, col + max(len(str(tok)) if not tok.type.startswith("_") else 1, 1)
        )
        hint = _keyword_hint(str(tok), source.line_text(tok.line)) or _hint(tok, err.expected, line)
        return SpecError(f"unexpected {got}", source, span, hint, code="E102")
    expected = err.expected if isinstance(err, (UnexpectedToken, UnexpectedEOF)) else set()
    # lines end at "\n" only, as the lexer counts them
    last = source.text.rstrip("\n").count("\n") + 1
    end_col = len(source.line_text(last)) + 1
    return SpecError(
        "unexpected end of file",
        source,
        Span(last, end_col, last, end_col + 1),
        _expected_hint(expected) or "the spec stops in the middle of a statement",
        code="E103",
    )


_KEYWORDS = (
    "optimizer",
    "hyper",
    "option",
    "state",
    "input",
    "output",
    "update",
    "if",
    "else",
    "repeat",
    "true",
    "false",
    "and",
    "or",
    "not",
)
# Python's loops, which a spec writes as a bounded repeat.
_LOOPS = {
    "for": "a loop is written 'repeat N:' (N a number or a numeric option), e.g. repeat 5:",
    "while": "loops are bounded: write 'repeat N:' (N a number or a numeric option)",
}


def _keyword_hint(token: str, line: str) -> str | None:
    """'did you mean' for a misspelt keyword: the unexpected word, or a line's first word used as
    one.
    """
    first = re.match(r"\s*([A-Za-z_]\w*)(\s+[A-Za-z_]|\s*:)", line)
    if first and first[1] in _LOOPS:
        return _LOOPS[first[1]]
    for word in (first and first[1], token if len(token) > 2 else None):
        if word and word not in _KEYWORDS and (hint := did_you_mean(word, _KEYWORDS)):
            return hint
    return None


def _hint(tok: Token, expected: set[str], line: int) -> str | None:
    if "RPAR" in expected and tok.type.startswith("_"):
        return "a '(' is not closed: add ')'"
    if tok.type == "MUL_OP" and "MUL_OP" not in expected and tok == "*":
        return "write powers as a ^ b"
    if line == 1 or "optimizer" in expected or "OPTIMIZER" in expected:
        return 'a spec starts with: optimizer NAME "description"'
    return _expected_hint(expected)


def _expected_hint(expected: set[str]) -> str | None:
    names = sorted({_describe(t) for t in expected if t != "$END"})
    if not names:
        return None
    if len(names) > 6:
        return "the statement is incomplete or has an extra token here"
    return "expected " + ", ".join(names[:-1]) + (" or " if len(names) > 1 else "") + names[-1]
