"""The fixed text of the `expert_preamble` context (METHOD.md section 2): the teacher reads it before the problem.

The text is reconstructed from the predictive-law paper's description of its template (arXiv 2605.30070,
Table 3): an expert preamble made of a data-structure and algorithm checklist, a table of the complexity each
input size allows, pattern rules, edge cases and a 9-step methodology. The paper names these parts but does not
print the text, so the wording below is this project's: an `expert_preamble` result measures this text, which
may differ from the paper's. To try another wording, give it as a user template (`context.template` with
`{prompt}`) under a name of its own.
"""

EXPERT_PREAMBLE = """\
You are an expert competitive programmer. Before writing code, work through this checklist.

Data structures and algorithms to consider:
- Hash maps and sets for membership, counting and de-duplication in O(1) per operation.
- Sorting, then two pointers or binary search; binary search on the answer when feasibility is monotone.
- Prefix sums and difference arrays for range sums and range updates.
- Stacks (monotonic stacks for next greater/smaller element), queues and deques (sliding-window extremes).
- Heaps for the k smallest/largest items, scheduling and Dijkstra's shortest paths.
- BFS/DFS on graphs and grids; union-find for connectivity; topological sort for dependencies.
- Dynamic programming over prefixes, intervals, subsets (bitmasks) or digits; memoised recursion.
- Greedy choices, only with an exchange argument that they are optimal.
- Number theory: gcd, modular arithmetic (10^9 + 7), fast exponentiation, sieve of Eratosthenes.
- Strings: counting characters, sliding windows, prefix function/KMP, hashing.

Complexity that fits in about one second of Python, by input size n:
| n up to | acceptable complexity |
|---|---|
| 10 | O(n!) or O(2^n * n) |
| 20 | O(2^n * n) |
| 500 | O(n^3) |
| 5,000 | O(n^2) |
| 10^5 to 10^6 | O(n log n) or O(n) |
| 10^9 and more | O(log n) or O(1): a formula, binary search or fast exponentiation |

Pattern rules:
- "Minimum/maximum number of operations" or "number of ways": look for dynamic programming or a greedy rule.
- "Smallest value such that ..." with a monotone condition: binary search on the answer.
- Contiguous subarrays or substrings: prefix sums, sliding window or two pointers.
- Pairs satisfying a condition: sort first, or count with a hash map in one pass.
- Grids and shortest paths with unit weights: BFS; with non-negative weights: Dijkstra.
- Answers that can be huge: take the modulus the statement asks for at every step.

Edge cases to check:
- Empty input, a single element, all elements equal, already sorted or reverse-sorted input.
- The smallest and largest values allowed by the constraints; negative numbers and zero.
- Duplicates, ties, off-by-one errors at the boundaries of loops and ranges.
- Integer overflow does not happen in Python, but slow big-number arithmetic can.
- Reading the input exactly as specified: several test cases, trailing spaces, blank lines.

Method, step by step:
1. Restate the task, its input and its output in your own words.
2. Read the constraints and decide from the table above which complexity is acceptable.
3. Work through the examples by hand until you can reproduce every expected output.
4. Match the problem against the pattern rules above.
5. Choose the algorithm and data structures from the checklist, and argue briefly why the approach is correct.
6. Check the approach's time and memory against the constraints; if it is too slow, go back to step 4.
7. List the edge cases above that apply to this problem and how the approach handles each one.
8. Write clean Python: fast input reading (sys.stdin) for large inputs, no needless recursion depth.
9. Trace the code on the examples and the edge cases before giving the final answer."""
