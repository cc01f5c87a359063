"""Document generators for the non-English domains: Chinese, arithmetic, code and records.

Each generator is ``fn(rng: random.Random) -> str`` and touches no global random state.
Arithmetic keeps a fixed slice of two-digit problems out of training (``is_heldout_problem``) so
the arithmetic prompt set tests generalisation, not memory.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from string import Template

from ernie_lab.toy.world import COLOURS, PETS, WORLD

# --- Chinese ------------------------------------------------------------------------------------

_SURNAMES = "王李张刘陈杨赵黄周吴徐孙马朱胡林郭何高罗"
_GIVEN = ("明", "华", "丽", "强", "芳", "伟", "静", "磊", "洋", "敏", "杰", "婷", "小红", "建国", "晓东", "海燕")
_CN_PLACES = ("北京", "上海", "广州", "深圳", "杭州", "成都", "南京", "武汉", "西安", "重庆", "苏州", "青岛")
_CN_OBJECTS = (
    ("本", "书"), ("个", "苹果"), ("杯", "茶"), ("辆", "自行车"), ("台", "电脑"),
    ("把", "雨伞"), ("个", "面包"), ("朵", "花"), ("部", "手机"), ("件", "衣服"),
)  # fmt: skip
_CN_JOBS = ("老师", "医生", "工程师", "厨师", "司机", "画家", "农民", "护士", "律师", "学生")
_CN_HOBBIES = ("看书", "跑步", "写字", "做饭", "唱歌", "画画", "游泳", "打球", "下棋", "钓鱼")
_CN_TIMES = ("今天", "昨天", "明天", "周末", "早上", "晚上", "上午", "下午")
_CN_DAILY = ("早上", "晚上", "上午", "下午", "中午")
_CN_WEATHER = ("是晴天", "下雨了", "下雪了", "多云", "刮大风")
_CN_COLOURS = ("红色", "蓝色", "绿色", "黄色", "黑色", "白色")
_CN_COUNTS = ("一", "两", "三", "四", "五", "六", "七", "八", "九", "十")


def chinese_name(rng: random.Random) -> str:
    return rng.choice(_SURNAMES) + rng.choice(_GIVEN)


@dataclass(frozen=True)
class ChinesePerson:
    """One resident of the Chinese fact table: every document says the same about them."""

    name: str
    job: str
    city: str
    hobby: str
    age: int
    colour: str
    friend: int  # index of their friend in the table


def _chinese_people(n: int = 96, seed: int = 4_5_86) -> tuple[ChinesePerson, ...]:
    """A fixed table of ``n`` people with distinct names, built once from ``seed`` (never a corpus seed).

    The facts are knowledge the corpus repeats and only memory can supply: the toy model must store
    them somewhere, and the routed experts its Chinese tokens use are the natural place. Everyone has
    a friend (one cycle through the table, drawn after the other facts); sentences about a friend's city,
    job or hobby are two-hop facts, Chinese-only work for the middle layers as well (README, runs W-Y).
    """
    rng = random.Random(seed)
    names = rng.sample([s + g for s in _SURNAMES for g in _GIVEN], n)
    facts = [
        (
            rng.choice(_CN_JOBS),
            rng.choice(_CN_PLACES),
            rng.choice(_CN_HOBBIES),
            rng.randint(6, 80),
            rng.choice(_CN_COLOURS),
        )
        for _ in names
    ]
    order = list(range(n))
    rng.shuffle(order)  # a single cycle through the table: everyone's friend is someone else
    friend = dict(zip(order, order[1:] + order[:1]))
    return tuple(ChinesePerson(name, *facts[i], friend=friend[i]) for i, name in enumerate(names))


CN_PEOPLE = _chinese_people()


def _chinese_fact(rng: random.Random) -> str:
    """A sentence stating facts of one person of ``CN_PEOPLE`` (the same facts in every document)."""
    p = rng.choice(CN_PEOPLE)
    f = CN_PEOPLE[p.friend]
    choices = (
        f"{p.name}是一名{p.job}，住在{p.city}。",
        f"{p.name}住在{p.city}，是一名{p.job}。",
        f"{p.name}的工作是{p.job}。",
        f"{p.name}喜欢{p.hobby}。",
        f"{p.name}每天{rng.choice(_CN_DAILY)}都要{p.hobby}。",
        f"{p.name}今年{p.age}岁。",
        f"{p.name}最喜欢{p.colour}。",
        f"{p.name}的家在{p.city}。",
        f"{p.name}的朋友是{f.name}。",
        f"{p.name}的朋友住在{f.city}。",
        f"{p.name}的朋友是一名{f.job}。",
        f"{p.name}的朋友喜欢{f.hobby}。",
    )
    return rng.choice(choices)


def _chinese_sentence(rng: random.Random) -> str:
    """Mostly facts of the table; the rest free sentences about random people (not memorisable)."""
    if rng.random() < 0.7:
        return _chinese_fact(rng)
    n, n2 = chinese_name(rng), chinese_name(rng)
    place, t = rng.choice(_CN_PLACES), rng.choice(_CN_TIMES)
    measure, obj = rng.choice(_CN_OBJECTS)
    choices = (
        f"{t}{n}在{place}买了{rng.choice(_CN_COUNTS)}{measure}{obj}。",
        f"{place}{t}{rng.choice(_CN_WEATHER)}，{n}决定在家{rng.choice(_CN_HOBBIES)}。",
        f"{n}和{n2}一起去{place}旅游。",
        f"{n}问{n2}：“你想去{place}吗？”{n2}说：“好啊，我们{t}去吧。”",
        f"{n}的{obj}是{rng.choice(_CN_COLOURS)}的。",
    )
    return rng.choice(choices)


def chinese_document(rng: random.Random) -> str:
    """One to three paragraphs of simple Chinese sentences, most of them facts of ``CN_PEOPLE``."""
    paragraphs = ["".join(_chinese_sentence(rng) for _ in range(rng.randint(4, 8))) for _ in range(rng.randint(1, 3))]
    return "\n".join(paragraphs)


# --- arithmetic ---------------------------------------------------------------------------------


def is_heldout_problem(a: int, op: str, b: int) -> bool:
    """A fixed tenth of the problems with a two-digit operand, never shown in training.

    Chosen by a hash of the whole problem, so every pair of units digits (and every carry pattern)
    still occurs in training: the held-out problems test the algorithm, not an unseen digit pair.
    """
    return max(a, b) >= 10 and zlib.crc32(f"{a}{op}{b}".encode()) % 10 == 3


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def sample_problem(rng: random.Random, *, heldout: bool = False, max_operand: int = 99) -> tuple[int, str, int]:
    """``(a, op, b)``: addition and subtraction up to ``max_operand``, multiplication up to 12."""
    while True:
        op = rng.choice("++--*")
        top = 12 if op == "*" else (9 if rng.random() < 0.25 else max_operand)
        a, b = rng.randint(0, top), rng.randint(0, top)
        if op == "-" and b > a:
            a, b = b, a
        if is_heldout_problem(a, op, b) == heldout:
            return a, op, b


def format_problem(a: int, op: str, b: int, *, with_answer: bool = True) -> str:
    return f"{a}{op}{b}=" + (str(solve(a, op, b)) if with_answer else "")


def arithmetic_document(rng: random.Random) -> str:
    """Lines of several solved problems, e.g. ``37+45=82 9*7=63 60-18=42``."""
    lines = [
        " ".join(format_problem(*sample_problem(rng)) for _ in range(rng.randint(2, 5)))
        for _ in range(rng.randint(2, 5))
    ]
    return "\n".join(lines)


# --- code ---------------------------------------------------------------------------------------

_CODE_TEMPLATES = (
    "def $fn($xs, limit=$lim):\n    $acc = 0\n    for $x in $xs:\n        if $x > limit:\n"
    "            $acc += $x\n    return $acc\n",
    "def count_$xs($xs):\n    $acc = 0\n    for $x in $xs:\n        if $x == $k:\n"
    "            $acc += 1\n    return $acc\n",
    "def largest_$x($xs):\n    $acc = $xs[0]\n    for $x in $xs:\n        if $x > $acc:\n"
    "            $acc = $x\n    return $acc\n",
    "def clamp_$x($x, low=$k, high=$lim):\n    if $x < low:\n        return low\n"
    "    if $x > high:\n        return high\n    return $x\n",
    "def scale_$xs($xs, factor=$k):\n    return [$x * factor for $x in $xs]\n",
    "def index_$xs($xs):\n    $acc = {}\n    for i, $x in enumerate($xs):\n        $acc[$x] = i\n    return $acc\n",
    'def greet_$x(name):\n    return "Hello, " + name + "!"\n',
    "def $fn(n):\n    $acc = 1\n    while n > 1:\n        $acc *= n\n        n -= 1\n    return $acc\n",
    "def is_$adj($x):\n    return $x % $k == 0\n",
    "class $Cls:\n    def __init__(self, $x):\n        self.$x = $x\n\n    def get_$x(self):\n        return self.$x\n",
)
_NOUNS = ("item", "value", "score", "price", "count", "weight", "size", "point", "order", "task")
_VERBS = ("total", "collect", "sum", "gather", "compute", "measure", "tally", "combine")
_ACCS = ("total", "result", "acc", "out", "best", "seen")
_ADJS = ("even", "round", "valid", "small", "ready")


def _code_function(rng: random.Random) -> str:
    noun = rng.choice(_NOUNS)
    fields = {
        "fn": f"{rng.choice(_VERBS)}_{noun}s",
        "xs": f"{noun}s",
        "x": noun,
        "acc": rng.choice(_ACCS),
        "lim": str(rng.randint(10, 50)),
        "k": str(rng.randint(2, 9)),
        "adj": rng.choice(_ADJS),
        "Cls": noun.capitalize() + rng.choice(("Box", "List", "Store", "Holder")),
    }
    source = Template(rng.choice(_CODE_TEMPLATES)).substitute(fields)
    if rng.random() < 0.4 and source.startswith("def "):
        name = source[4 : source.index("(")]
        args = ", ".join(str(rng.randint(0, 20)) for _ in range(rng.randint(2, 5)))
        source += f"\n\nprint({name}([{args}]))\n"
    return source


def code_document(rng: random.Random) -> str:
    """One to three small Python functions (sometimes with a call)."""
    return "\n\n".join(_code_function(rng).rstrip("\n") for _ in range(rng.randint(1, 3))) + "\n"


# --- records ------------------------------------------------------------------------------------


def _person_record(rng: random.Random) -> dict:
    p = rng.choice(WORLD.people)
    record = {"name": p.name, "age": p.age, "city": p.city, "job": p.job, "pet": p.pet, "employer": p.employer}
    keep = ["name"] + rng.sample(list(record)[1:], rng.randint(2, 5))
    return {k: record[k] for k in record if k in keep}


def _product_record(rng: random.Random) -> dict:
    c = rng.choice(WORLD.companies)
    return {
        "id": rng.randint(1000, 9999),
        "product": c.product,
        "maker": c.name,
        "price": round(rng.uniform(1, 200), 2),
        "stock": rng.randint(0, 500),
        "colour": rng.choice(COLOURS),
    }


def _order_record(rng: random.Random) -> dict:
    items = rng.sample([c.product for c in WORLD.companies], rng.randint(1, 3))
    return {
        "order": rng.randint(10000, 99999),
        "customer": rng.choice(WORLD.people).name,
        "items": items,
        "paid": rng.random() < 0.7,
        "ship_to": rng.choice(WORLD.cities),
    }


def _pet_record(rng: random.Random) -> dict:
    return {"pet": rng.choice(PETS), "owner": rng.choice(WORLD.people).name, "age": rng.randint(1, 15)}


def records_document(rng: random.Random) -> str:
    """Two to five JSON records of one kind, one per line.

    No Chinese rows: they made records share the Chinese experts (README, runs Q-R).
    """
    kind = rng.choice((_person_record, _person_record, _product_record, _order_record, _pet_record))
    return "\n".join(json.dumps(kind(rng), ensure_ascii=False) for _ in range(rng.randint(2, 5)))
