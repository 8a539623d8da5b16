# Forged tool fib v1 by BRICK. The live image holds the source of truth; this copy is for reading.
def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
