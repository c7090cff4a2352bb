"""Prompts for benchmarks/speculative.py: two workloads, five prompts each.

edit: the answer repeats most of the code in the prompt (type hints, docstrings, a bug fix, renames).
generation: the answer is new code.
"""

INVENTORY = '''class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count, price):
        if name in self.items:
            self.items[name]["count"] += count
        else:
            self.items[name] = {"count": count, "price": price}

    def remove(self, name, count):
        if name not in self.items:
            raise KeyError(name)
        item = self.items[name]
        if item["count"] < count:
            raise ValueError("not enough " + name)
        item["count"] -= count
        if item["count"] == 0:
            del self.items[name]

    def total_value(self):
        total = 0
        for name, item in self.items.items():
            total += item["count"] * item["price"]
        return total

    def report(self):
        lines = []
        for name in sorted(self.items):
            item = self.items[name]
            lines.append(name + ": " + str(item["count"]) + " x " + str(item["price"]))
        return "\\n".join(lines)
'''

USERS = '''import csv


def load_users(path):
    users = []
    with open(path) as f:
        for row in csv.reader(f):
            name, age, email = row
            users.append({"name": name, "age": int(age), "email": email})
    return users


def average_age(users):
    total = 0
    for user in users:
        total += user["age"]
    return total / len(users)


def find_by_email(users, email):
    for user in users:
        if user["email"] == email:
            return user
    return None


def oldest(users):
    best = None
    for user in users:
        if best is None or user["age"] > best["age"]:
            best = user
    return best
'''

BUGGY = '''def moving_average(values, window):
    """Return the averages of every run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    averages = []
    for start in range(len(values) - window):
        chunk = values[start:start + window]
        averages.append(sum(chunk) / window)
    return averages


def normalize(values):
    """Scale values to the range 0..1."""
    low = min(values)
    high = max(values)
    if high == low:
        return [0.0 for _ in values]
    return [(v - low) / (high - low) for v in values]


def summarize(values, window=3):
    """Moving average and normalized values, side by side."""
    return {
        "moving_average": moving_average(values, window),
        "normalized": normalize(values),
        "count": len(values),
    }
'''

FETCH = '''import json
import urllib.request


def get_data(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def get_data_many(urls):
    results = {}
    for url in urls:
        try:
            results[url] = get_data(url)
        except OSError as error:
            results[url] = {"error": str(error)}
    return results


def count_errors(results):
    errors = 0
    for url, data in results.items():
        if "error" in data:
            errors += 1
    return errors
'''

FORMAT = '''def describe(person):
    return "%s is %d years old and lives in %s" % (person["name"], person["age"], person["city"])


def greet(name, hour):
    if hour < 12:
        return "Good morning, %s!" % name
    if hour < 18:
        return "Good afternoon, %s!" % name
    return "Good evening, %s!" % name


def price_line(item, price, quantity):
    total = price * quantity
    return "%-20s %8.2f x %3d = %10.2f" % (item, price, quantity, total)


def progress(done, total):
    percent = 100.0 * done / total
    return "%d of %d done (%.1f%%)" % (done, total, percent)
'''


def ask(instruction: str, code: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{instruction} Reply with the complete code only.\n\n```python\n"
             f"{code}```"}]


EDIT = {
    "type-hints": ask("Add type hints to every function in this Python code.", USERS),
    "docstrings": ask("Add a one-line docstring to each method of this class.", INVENTORY),
    "fix-bug": ask("moving_average drops the last window. Fix the bug.", BUGGY),
    "rename": ask("Rename get_data to fetch_json and get_data_many to fetch_all everywhere.", FETCH),
    "f-strings": ask("Convert every % string formatting in this code to f-strings.", FORMAT),
}

GENERATION = {
    "lru-cache": [{"role": "user", "content": "Write a Python class LRUCache with get and put methods "
                   "and a fixed capacity, without using functools."}],
    "bst": [{"role": "user", "content": "Implement a binary search tree in Python with insert, search, "
             "delete and in-order traversal."}],
    "retry": [{"role": "user", "content": "Write a Python decorator that retries a function with "
               "exponential backoff on exceptions, with a maximum number of attempts."}],
    "argparse": [{"role": "user", "content": "Write a Python command-line tool with argparse that counts "
                  "lines, words and characters in the files given as arguments."}],
    "matrix": [{"role": "user", "content": "Write Python functions to multiply two matrices given as "
                "lists of lists, transpose a matrix, and compute its determinant."}],
}
