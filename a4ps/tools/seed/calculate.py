"""A seed tool shipped with A4PS: exact arithmetic and unit conversion read from words.

Vetted code, not model-written: it is registered as the tool ``calculate`` when an
image is seeded and runs in the gVisor sandbox like every forged tool. It reads the
question as a person writes it ("What is 17 times 23?", "15% of 240", "square root of
144", "Convert 5 miles to kilometers", "How many grams are in 2.5 kilograms?") and
returns the exact result, so a small model never has to do the arithmetic or re-type
the numbers. It imports only ``math`` and ``re`` (the forge's static gate passes it)
and never evaluates text as code: expressions go through the small parser below.
"""
import math
import re

NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
    "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
    "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17,
    "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100,
    "thousand": 1000, "million": 1000000,
}

# unit -> (dimension, factor to the dimension's base unit); temperature is affine
UNITS = {
    "length": {"mm": 0.001, "millimeter": 0.001, "millimetre": 0.001,
               "cm": 0.01, "centimeter": 0.01, "centimetre": 0.01,
               "m": 1.0, "meter": 1.0, "metre": 1.0,
               "km": 1000.0, "kilometer": 1000.0, "kilometre": 1000.0,
               "in": 0.0254, "inch": 0.0254, "ft": 0.3048, "foot": 0.3048, "feet": 0.3048,
               "yd": 0.9144, "yard": 0.9144, "mi": 1609.344, "mile": 1609.344},
    "mass": {"mg": 0.001, "milligram": 0.001, "g": 1.0, "gram": 1.0,
             "kg": 1000.0, "kilogram": 1000.0, "t": 1000000.0, "tonne": 1000000.0,
             "oz": 28.349523125, "ounce": 28.349523125,
             "lb": 453.59237, "lbs": 453.59237, "pound": 453.59237, "stone": 6350.29318},
    "time": {"ms": 0.001, "millisecond": 0.001, "s": 1.0, "sec": 1.0, "second": 1.0,
             "min": 60.0, "minute": 60.0, "h": 3600.0, "hr": 3600.0, "hour": 3600.0,
             "day": 86400.0, "week": 604800.0, "year": 31557600.0},
    "volume": {"ml": 0.001, "milliliter": 0.001, "millilitre": 0.001,
               "l": 1.0, "liter": 1.0, "litre": 1.0,
               "gallon": 3.785411784, "quart": 0.946352946, "pint": 0.473176473,
               "cup": 0.2365882365},
    "area": {"m2": 1.0, "square meter": 1.0, "square metre": 1.0, "km2": 1000000.0,
             "square kilometer": 1000000.0, "square kilometre": 1000000.0,
             "hectare": 10000.0, "acre": 4046.8564224, "square foot": 0.09290304,
             "square feet": 0.09290304},
    "speed": {"km/h": 1 / 3.6, "kph": 1 / 3.6, "kilometers per hour": 1 / 3.6,
              "kilometres per hour": 1 / 3.6, "mph": 0.44704, "miles per hour": 0.44704,
              "m/s": 1.0, "meters per second": 1.0, "metres per second": 1.0},
    "data": {"byte": 1.0, "kb": 1000.0, "kilobyte": 1000.0, "mb": 1e6, "megabyte": 1e6,
             "gb": 1e9, "gigabyte": 1e9, "tb": 1e12, "terabyte": 1e12},
}
TEMPERATURE = {"c": "C", "celsius": "C", "centigrade": "C", "f": "F", "fahrenheit": "F",
               "k": "K", "kelvin": "K"}
TEMPERATURE_NAMES = {"C": "degrees Celsius", "F": "degrees Fahrenheit", "K": "kelvin"}

NUM = r"\d+(?:,\d{3})*(?:\.\d+)?|\.\d+"      # unsigned: a minus is the parser's


class CalcError(ValueError):
    """The text holds no computation this tool can do exactly."""


# -- numbers ---------------------------------------------------------------------------

def words_to_digits(text):
    """'twenty five' -> '25', 'three hundred' -> '300' (number words in the text)."""
    names = "|".join(sorted(NUMBER_WORDS, key=len, reverse=True))
    run = re.compile(r"\b(?:(?:" + names + r")(?:[\s-]+|\b))+", re.I)

    def value(match):
        words = [w for w in re.split(r"[\s-]+", match.group(0).lower()) if w]
        total, current = 0, 0
        for w in words:
            n = NUMBER_WORDS[w]
            if n == 100:
                current = max(current, 1) * 100
            elif n >= 1000:
                total += max(current, 1) * n
                current = 0
            else:
                current += n
        trail = match.group(0)[len(match.group(0).rstrip()):]
        return str(total + current) + trail
    return run.sub(value, text)


def to_number(text):
    return float(text.replace(",", ""))


def show(x):
    """A result as a person writes it: 391, 8.04672, 0.3333333333, 1.5e-07 (ten
    significant digits)."""
    if isinstance(x, float) and not math.isfinite(x):
        raise CalcError("the result is not a finite number")
    if float(x) == int(x) and abs(x) < 1e15:
        return str(int(x))
    text = "%.10g" % x
    if "e" in text:
        return text
    return text.rstrip("0").rstrip(".") if "." in text else text


# -- arithmetic: words to symbols, then a small recursive-descent parser ------------------

OPERATOR_WORDS = [
    (r"\bsquare\s+root\s+of\b", " sqrt "), (r"\bcube\s+root\s+of\b", " cbrt "),
    (r"\bto\s+the\s+power\s+of\b", " ^ "), (r"\braised\s+to(?:\s+the\s+power\s+of)?\b", " ^ "),
    (r"\bsquared\b", " ^ 2 "), (r"\bcubed\b", " ^ 3 "),
    (r"\bmultiplied\s+by\b", " * "), (r"\btimes\b", " * "),
    (r"\bdivided\s+by\b", " / "), (r"\bover\b", " / "),
    (r"\bplus\b", " + "), (r"\badded\s+to\b", " + "), (r"\bminus\b", " - "),
    (r"\bpercent\s+of\b", " % "), (r"%\s*of\b", " % "), (r"\bpercent\b", " %% "),
    (r"\bhalf\s+of\b", " 0.5 * "), (r"\bdouble\b", " 2 * "),
    (r"\bmod(?:ulo)?\b", " mod "),
]
SYMBOLS = {"×": "*", "x": "*", "·": "*", "÷": "/", "−": "-", "**": "^", "√": " sqrt "}
TOKEN = re.compile(r"\s*(" + NUM + r"|sqrt|cbrt|mod|%%|[-+*/^()%])")


def symbolic(text):
    """The text with operator words and symbols written as the parser's tokens."""
    out = " " + text.lower() + " "
    out = re.sub(r"([\d)])\s*[x×]\s*(?=[\d.(])", r"\1 * ", out)
    for sym, rep in SYMBOLS.items():
        if sym != "x":
            out = out.replace(sym, rep)
    for pattern, rep in OPERATOR_WORDS:
        out = re.sub(pattern, rep, out)
    return out


def tokens_of(span):
    toks, pos = [], 0
    span = span.strip()
    while pos < len(span):
        m = TOKEN.match(span, pos)
        if not m:
            return None
        toks.append(m.group(1))
        pos = m.end()
        while pos < len(span) and span[pos].isspace():
            pos += 1
    return toks


class Parser:
    """expr := term (('+'|'-') term)*; term := power (('*'|'/'|'%'|'mod') power)*;
    power := unary ('^' power)?; unary := '-' unary | 'sqrt' unary | 'cbrt' unary | atom '%%'?;
    atom := number | '(' expr ')'. ``a % b`` reads "a percent of b"."""

    def __init__(self, toks):
        self.toks = toks
        self.i = 0
        self.shown = []

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def parse(self):
        value, shown = self.expr()
        if self.peek() is not None:
            raise CalcError("unexpected " + str(self.peek()))
        return value, shown

    def expr(self):
        value, shown = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            right, rshown = self.term()
            value = value + right if op == "+" else value - right
            shown = shown + " " + op + " " + rshown
        return value, shown

    def term(self):
        value, shown = self.power()
        while self.peek() in ("*", "/", "%", "mod"):
            op = self.take()
            right, rshown = self.power()
            if op == "*":
                value, shown = value * right, shown + " × " + rshown
            elif op == "/":
                if right == 0:
                    raise CalcError("division by zero")
                value, shown = value / right, shown + " ÷ " + rshown
            elif op == "%":
                value, shown = value / 100.0 * right, shown + "% of " + rshown
            else:
                if right == 0:
                    raise CalcError("modulo by zero")
                value, shown = value % right, shown + " mod " + rshown
        return value, shown

    def power(self):
        base, shown = self.unary()
        if self.peek() == "^":
            self.take()
            exp, eshown = self.power()
            if abs(exp) > 1000 or (abs(base) > 1 and abs(exp) * math.log10(abs(base)) > 300):
                raise CalcError("the power is too large")
            if base < 0 and exp != int(exp):
                raise CalcError("a negative number to a fractional power")
            return base ** exp, shown + "^" + eshown
        return base, shown

    def unary(self):
        tok = self.peek()
        if tok == "-":
            self.take()
            value, shown = self.unary()
            return -value, "-" + shown
        if tok in ("sqrt", "cbrt"):
            self.take()
            value, shown = self.unary()
            if tok == "sqrt":
                if value < 0:
                    raise CalcError("the square root of a negative number")
                return math.sqrt(value), "√" + shown
            return math.copysign(abs(value) ** (1.0 / 3.0), value), "∛" + shown
        value, shown = self.atom()
        if self.peek() == "%%":
            self.take()
            return value / 100.0, shown + "%"
        return value, shown

    def atom(self):
        tok = self.take()
        if tok == "(":
            value, shown = self.expr()
            if self.take() != ")":
                raise CalcError("a bracket is not closed")
            return value, "(" + shown + ")"
        if tok is None or not re.fullmatch(NUM, tok):
            raise CalcError("expected a number, found " + str(tok))
        return to_number(tok), tok


def arithmetic(text):
    """(value, expression as shown) for the longest computation in the text, or None."""
    sym = symbolic(words_to_digits(text))
    spans = re.findall(r"(?:sqrt|cbrt|[-+*/^()%\d.,\s]|mod)+", sym)
    best = None
    why = None
    for span in spans:
        span = span.strip(" ,.")
        toks = tokens_of(span)
        if not toks or not any(t in ("+", "-", "*", "/", "^", "%", "%%", "sqrt", "cbrt", "mod")
                               for t in toks[1:] + toks[:1]):
            continue
        if sum(1 for t in toks if re.fullmatch(NUM, t)) < 1:
            continue
        try:
            value, shown = Parser(toks).parse()
            show(value)
        except (CalcError, OverflowError, ZeroDivisionError, ValueError) as e:
            why = why or str(e)
            continue
        if best is None or len(toks) > best[2]:
            best = (value, shown, len(toks))
    if best is None:
        if why:
            raise CalcError("cannot compute " + repr(text[:80]) + ": " + why)
        return None
    return best[0], best[1]


# -- unit conversion -------------------------------------------------------------------------

def unit_of(words):
    """(dimension, factor, shown name) for a unit written as ``words``, or None."""
    w = words.lower().strip().rstrip(".?!,")
    w = re.sub(r"^(?:degrees?\s+|°\s*)", "", w)
    if w in TEMPERATURE:
        code = TEMPERATURE[w]
        return "temperature", code, TEMPERATURE_NAMES[code]
    for cand in (w, w[:-1] if w.endswith("s") else w, w[:-2] if w.endswith("es") else w):
        for dim, table in UNITS.items():
            if cand in table:
                return dim, table[cand], cand if len(cand) > 3 else w
    return None


def unit_names():
    names = set(TEMPERATURE)
    for table in UNITS.values():
        for name in table:
            names.add(name)
            if len(name) > 2:
                names.add(name + "s")
                names.add(name + "es")
    return sorted(names, key=len, reverse=True)


def unit_pattern():
    units = "|".join(re.escape(n) for n in unit_names())
    return r"(?:degrees?\s+|°\s*)?(?:" + units + r")\b"


def as_written(words, unit):
    """The unit as the question wrote it ("miles"), temperatures by their full name."""
    if unit[0] == "temperature":
        return unit[2]
    return " ".join(words.split())


def convert_temperature(value, src, dst):
    celsius = {"C": value, "F": (value - 32) * 5 / 9, "K": value - 273.15}[src]
    return {"C": celsius, "F": celsius * 9 / 5 + 32, "K": celsius + 273.15}[dst]


def conversion(text):
    """(value, source shown, target shown) for "N unit to unit" in the text, or None."""
    t = words_to_digits(text)
    unit = unit_pattern()
    forms = [
        r"(?P<neg>-\s*)?(?P<n>" + NUM + r")\s*(?P<src>" + unit + r")\s+"
        r"(?:to|in|into|as|in terms of)\s+(?P<dst>" + unit + ")",
        r"how\s+many\s+(?P<dst>" + unit + r")\s+(?:are\s+|is\s+|make\s+up\s+|go\s+)?"
        r"(?:there\s+)?(?:in|into)\s+(?:a\s+|an\s+)?(?P<n>" + NUM + r")?\s*(?P<src>" + unit + ")",
    ]
    for form in forms:
        m = re.search(form, t, re.I)
        if not m:
            continue
        src, dst = unit_of(m.group("src")), unit_of(m.group("dst"))
        if src is None or dst is None or src[0] != dst[0]:
            continue
        n = to_number(m.group("n")) if m.group("n") else 1.0
        if m.groupdict().get("neg"):
            n = -n
        if src[0] == "temperature":
            value = convert_temperature(n, src[1], dst[1])
        else:
            value = n * src[1] / dst[1]
        return value, show(n) + " " + as_written(m.group("src"), src), as_written(m.group("dst"), dst)
    return None


# -- the tool ----------------------------------------------------------------------------------

def calculate(question):
    """Work out the arithmetic or the unit conversion that ``question`` states.

    Returns {"answer": a sentence, "value": the number, "kind": "arithmetic" |
    "conversion", "expression": what was computed}. Raises CalcError when the text
    states no computation this tool can do exactly.
    """
    if not isinstance(question, str) or not question.strip():
        raise CalcError("give the question as text, e.g. 'What is 17 times 23?'")
    conv = conversion(question)
    if conv is not None:
        value, source, target = conv
        return {"answer": source + " = " + show(value) + " " + target, "value": value,
                "kind": "conversion", "expression": source + " to " + target}
    arith = arithmetic(question)
    if arith is not None:
        value, shown = arith
        return {"answer": shown + " = " + show(value), "value": value,
                "kind": "arithmetic", "expression": shown}
    raise CalcError("no arithmetic or unit conversion found in " + repr(question[:80]))
