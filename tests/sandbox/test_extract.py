"""Code extraction from responses and the assembly of HumanEval programs."""

from __future__ import annotations

import pytest

from sandbox.extract import (
    Extraction,
    assemble_program,
    code_blocks,
    defines_function,
    extract_code,
    extract_program,
    strip_function,
)
from sandbox.problems import Problem, ProblemTest

TWO_BLOCKS = """Here is a first try:

```python
print(1)
```

and a longer, better one:

```py
import sys
print(sum(map(int, sys.stdin.read().split())))
```

Finally a short one:
```
x = 1
```
"""


def test_longest_and_last_pick_different_blocks():
    assert extract_code(TWO_BLOCKS, mode="longest") == "import sys\nprint(sum(map(int, sys.stdin.read().split())))\n"
    assert extract_code(TWO_BLOCKS, mode="last") == "x = 1\n"
    assert code_blocks(TWO_BLOCKS) == ["print(1)\n", "import sys\nprint(sum(map(int, sys.stdin.read().split())))\n",
                                       "x = 1\n"]


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="longest"):
        extract_code(TWO_BLOCKS, mode="first")


def test_no_block_is_none():
    assert extract_code("def f():\n    return 1\n") is None
    assert extract_code("") is None


def test_unclosed_block_is_not_code():
    # A response cut by the length limit leaves its last fence open: nothing to run.
    assert extract_code("```python\ndef f():\n    return") is None


def test_other_languages_and_empty_blocks_are_skipped():
    response = "```cpp\nint main() { return 0; }\n```\n```python\n\n```\n```python3\nprint(2)\n```\n"
    assert extract_code(response) == "print(2)\n"
    assert extract_code("```bash\nls\n```") is None


def test_indented_fence_in_a_list_item_is_dedented():
    response = "1. Code:\n   ```python\n   def f():\n       return 3\n   ```\n"
    assert extract_code(response) == "def f():\n    return 3\n"


def test_longer_fence_may_contain_triple_backticks():
    response = '````python\ns = """```"""\nprint(s)\n````\n'
    assert extract_code(response) == 's = """```"""\nprint(s)\n'


def test_equally_long_blocks_longest_takes_the_first():
    assert extract_code("```python\na = 1\n```\n```python\nb = 2\n```") == "a = 1\n"


PROMPT = 'import math\n\n\ndef helper(x):\n    return x + 1\n\n\ndef entry(x: int) -> int:\n    """Doc."""\n'
HE = Problem(id="HumanEval/x", prompt=PROMPT, tests=[ProblemTest(kind="check", input="assert candidate(1) == 2")],
             func_name="entry", source="humaneval")


def test_strip_function_removes_only_the_entry_point():
    stripped = strip_function(PROMPT, "entry")
    assert "def entry" not in stripped and "def helper" in stripped and "import math" in stripped
    decorated = "import functools\n@functools.cache\ndef entry():\n    return 1\nY = 2\n"
    assert strip_function(decorated, "entry") == "import functools\nY = 2\n"
    assert strip_function("not python (", "entry") == "not python ("


def test_full_function_is_preceded_by_the_prompt_helpers():
    code = "def entry(x):\n    return helper(x)\n"
    program = assemble_program(HE, code)
    namespace: dict = {}
    exec(program, namespace)
    assert namespace["entry"](1) == 2
    assert program.count("def entry") == 1


@pytest.mark.parametrize("body", ["    return helper(x)\n", "return helper(x)\n", "\n\nreturn helper(x)\n"])
def test_body_continues_the_prompt(body):
    program = assemble_program(HE, body)
    assert program.startswith(PROMPT)
    namespace: dict = {}
    exec(program, namespace)
    assert namespace["entry"](4) == 5


def test_other_sources_run_the_code_as_is():
    lcb = Problem(id="1", prompt="Add.", tests=[ProblemTest(kind="stdin", input="1 2", output="3")],
                  source="livecodebench")
    assert assemble_program(lcb, "print(3)\n") == "print(3)\n"


def test_defines_function_only_at_top_level():
    assert defines_function("def entry():\n    pass\n", "entry")
    assert not defines_function("class A:\n    def entry(self):\n        pass\n", "entry")
    assert not defines_function("def entry(:\n", "entry")
    method = "class Solution:\n    def entry(self):\n        pass\n"
    assert defines_function(method, "Solution.entry", methods=True)  # how a LeetCode-style entry point is named
    assert not defines_function(method, "Solution.entry")


def test_extract_program_gives_the_program_or_the_format_error_text():
    assert extract_program(HE, "```python\nreturn helper(x)\n```") == Extraction(PROMPT + "    return helper(x)\n")
    assert extract_program(HE, "no code") == Extraction(
        None, "Incorrect Format: Put your code inside a ```python ... ``` block.")
    cut = extract_program(HE, "```python\ndef entry(x):\n    return", truncated=True)
    assert cut.program is None and cut.format_error.startswith("Truncated Attempt: Your previous response was too long")
    # A closed block in a truncated response still runs.
    assert extract_program(HE, "```python\nreturn 1\n```\nmore tex", truncated=True).program is not None


# ------------------------------------------------------------------------ the block a grader would run
FENCE_IN_STRING = '''Here it is:

```python
HELP = """
Usage:
```
solve < input.txt
```
"""
x = \'\'\'
```
\'\'\'
print(len(HELP), len(x))
```
'''


def test_a_fence_inside_a_string_does_not_close_the_block():
    (code,) = code_blocks(FENCE_IN_STRING)
    namespace: dict = {}
    exec(compile(code, "<block>", "exec"), namespace)  # the whole program, strings included
    assert code.endswith("print(len(HELP), len(x))\n") and namespace["x"] == "\n```\n"


def test_a_string_that_never_closes_ends_at_the_first_fence():
    # Not Python either way: the block is what it was (the program's syntax error is the model's to see).
    response = "```python\nx = '''\n```\nprose after\n"
    assert code_blocks(response) == ["x = '''\n"]
    assert code_blocks("```text\ns = '''\n```\n```python\nprint(1)\n```\n") == ["print(1)\n"]


PROSE_AND_CODE = """The answer:

```python
def add(a, b):
    return a + b
```

```
Explanation: we add the two numbers a and b together and return the sum, which is exactly what the
problem statement asks for, in constant time and constant memory.
```
"""
DECOY = """```python
def add(a, b):
    return a + b
```

For reference, a longer version I decided against:

```python
def add_slowly(a, b):
    total = a
    for _ in range(b):
        total += 1
    return total
```
"""
ADD = Problem(id="add", prompt="Add.", func_name="add", tests=[ProblemTest(kind="functional", input="1\n2", output="3")])
SOLUTION = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("mode", ["longest", "last"])
def test_prose_and_decoy_blocks_lose_to_the_block_that_defines_the_entry_point(mode):
    assert extract_code(PROSE_AND_CODE, mode=mode, problem=ADD) == SOLUTION
    assert extract_code(DECOY, mode=mode, problem=ADD) == SOLUTION
    # Without an entry point: the blocks that parse (the prose block does not).
    stdin = Problem(id="s", prompt="", tests=[ProblemTest(kind="stdin", input="", output="")])
    assert extract_code(PROSE_AND_CODE, mode=mode, problem=stdin) == SOLUTION
    assert extract_code(PROSE_AND_CODE, mode=mode) == SOLUTION


def test_a_method_of_class_solution_is_the_entry_point():
    leet = Problem(id="l", prompt="", func_name="twoSum", tests=[ProblemTest(kind="functional", input="[1]\n1", output="[]")])
    response = ("```python\nclass Solution:\n    def twoSum(self, nums, target):\n        return []\n```\n"
                "Test it:\n```python\nprint(Solution().twoSum([1, 2, 3, 4, 5, 6, 7], 9))  # a longer block\n```\n")
    assert extract_code(response, mode="longest", problem=leet).startswith("class Solution:")
    assert extract_code(response, mode="last", problem=leet).startswith("class Solution:")


def test_a_humaneval_body_counts_as_complete_once_assembled():
    # The body parses only under the prompt's signature; a note that is no Python does not.
    response = "```python\n    return helper(x)\n```\n```\nthis returns helper of x, see above for the details\n```\n"
    assert extract_program(HE, response).program == PROMPT + "    return helper(x)\n"
