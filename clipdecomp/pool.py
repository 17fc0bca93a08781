"""The description pool of TextSpan: load it, encode it (cached), and how it was made.

TextSpan picks, for each head, texts out of a pool of short image descriptions. clipdecomp
ships a pool of its own (``clipdecomp/data/descriptions.txt``, one description a line, ``#``
lines are section titles) covering objects, animals, people, scenes, landscapes, countries,
colours, textures, shapes, materials, counts, styles, moods, lighting, weather, times of day,
art movements, viewpoints and the shapes world of the toy model. Any text file with one
description a line can replace it.

:func:`generate_descriptions` is the script that wrote the shipped file; it is not needed at
run time.

Shapes: M texts, D embedding dim.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import check_size

__all__ = ["DEFAULT_POOL", "encode_pool", "generate_descriptions", "load_pool"]

DEFAULT_POOL: Path = Path(__file__).resolve().parent / "data" / "descriptions.txt"


def load_pool(path: str | os.PathLike | None = None) -> list[str]:
    """Read a description pool: one text a line; blank lines and ``#`` comments skipped.

    Parameters
    ----------
    path : path, optional
        A text file (UTF-8). Default: the pool shipped with clipdecomp.

    Returns
    -------
    list of str
        The descriptions, in file order, stripped, duplicates removed (first kept).

    Examples
    --------
    >>> pool = load_pool()
    >>> len(pool) >= 3000
    True
    """
    path = DEFAULT_POOL if path is None else Path(path)
    seen: set[str] = set()
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.strip()
            if not text or text.startswith("#") or text in seen:
                continue
            seen.add(text)
            out.append(text)
    return out


def _model_key(model: Any) -> str:
    """A fingerprint of the model: config, checkpoint file identity, and a probe embedding."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    h.update(repr(cfg).encode())
    for attr in ("path", "checkpoint", "checkpoint_path", "filename"):
        p = getattr(model, attr, None)
        if isinstance(p, (str, os.PathLike)) and os.path.exists(p):
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}".encode())
            break
    # the weights themselves, through what they do to a fixed text (robust to copies/renames)
    probe = np.asarray(model.encode_text(["a photo of a dog on the grass."], normalize=True))
    h.update(np.round(probe.astype(np.float64), 3).tobytes())
    return h.hexdigest()[:24]


def _default_cache() -> Path:
    root = os.environ.get("CLIPDECOMP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "clipdecomp",
    )
    return Path(root)


def encode_pool(
    model: Any,
    texts: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None | bool = None,
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Unit text embeddings of a pool, cached on disk.

    Parameters
    ----------
    model : CLIP
        Anything with ``encode_text(list_of_str, normalize=True) -> [T, D]``.
    texts : sequence of str [M], optional
        Default: :func:`load_pool` ().
    cache_dir : path or False, optional
        Cache folder (default ``$CLIPDECOMP_CACHE`` or ``~/.cache/clipdecomp``); ``False``
        disables the cache. The key hashes the model (config, checkpoint file size and
        modification time when the model knows its path, and the embedding of a probe text,
        which changes with the weights) and the texts.
    batch_size : int
        Texts per ``encode_text`` call.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    ndarray float32 [M, D]
        Unit-normalised embeddings, row i for ``texts[i]``.

    Examples
    --------
    >>> pool = load_pool()                                     # doctest: +SKIP
    >>> T = encode_pool(model, pool)                           # doctest: +SKIP
    """
    texts = load_pool() if texts is None else [str(t) for t in texts]
    path = None
    if cache_dir is not False:
        root = _default_cache() if cache_dir is None or cache_dir is True else Path(cache_dir)
        digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:24]
        path = root / f"pool-{_model_key(model)}-{digest}.npy"
        if path.exists():
            try:
                out = np.load(path)
                if out.shape[0] == len(texts):
                    return out
            except (OSError, ValueError):
                pass  # a broken cache file: recompute
    batch_size = check_size(batch_size, "batch_size")
    starts = range(0, len(texts), batch_size)
    if progress:
        try:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encoding pool", total=len(starts))
        except ImportError:  # pragma: no cover
            pass
    parts = [
        np.asarray(model.encode_text(texts[i : i + batch_size], normalize=True), np.float32)
        for i in starts
    ]
    out = np.concatenate(parts, axis=0) if parts else np.zeros((0, 0), np.float32)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    out = (out / np.maximum(norm, 1e-30)).astype(np.float32)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npy")
            np.save(tmp, out)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache is no reason to fail
    return out


# =============================================================================================
# How descriptions.txt was written (not needed at run time):
#   python -c "from clipdecomp.pool import write_descriptions; write_descriptions()"

_VOWEL_EXCEPTIONS_AN = ("hour", "honest", "heir")
_VOWEL_EXCEPTIONS_A = ("uni", "use", "usu", "eu", "one", "ukulele", "u-")


def _a(phrase: str) -> str:
    """``phrase`` with the right indefinite article."""
    w = phrase.lower()
    if w.startswith(_VOWEL_EXCEPTIONS_AN):
        return "an " + phrase
    if w.startswith(_VOWEL_EXCEPTIONS_A):
        return "a " + phrase
    return ("an " if w[:1] in "aeiou" else "a ") + phrase


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# --------------------------------------------------------------------------- vocabularies
_COLORS = [
    "red", "blue", "green", "yellow", "orange", "purple", "pink", "black", "white", "gray",
    "brown", "beige", "turquoise", "teal", "navy blue", "maroon", "gold", "silver", "lime green",
    "olive green", "lavender", "crimson", "cream-colored", "bright red", "dark green",
    "pale blue", "mustard yellow", "coral", "magenta", "burgundy",
]
_COLOR_NOUNS = [
    "red", "blue", "green", "yellow", "orange", "purple", "pink", "black", "white", "gray",
    "brown", "turquoise", "teal", "gold", "silver", "lavender", "crimson", "magenta", "beige",
    "emerald green", "sky blue", "burgundy", "mint green", "ochre", "indigo", "peach",
    "charcoal", "ivory", "scarlet", "amber", "cobalt blue", "rust",
]

_OBJECTS = {
    # noun: (plural, colourable, materials)
    "car": ("cars", True, []),
    "bicycle": ("bicycles", True, []),
    "bus": ("buses", True, []),
    "truck": ("trucks", True, []),
    "motorcycle": ("motorcycles", True, []),
    "sailboat": ("sailboats", True, []),
    "rowing boat": ("rowing boats", True, ["wooden"]),
    "train": ("trains", True, []),
    "tractor": ("tractors", True, []),
    "scooter": ("scooters", True, []),
    "vintage car": ("vintage cars", True, []),
    "airplane": ("airplanes", True, []),
    "helicopter": ("helicopters", True, []),
    "hot air balloon": ("hot air balloons", True, []),
    "chair": ("chairs", True, ["wooden", "metal", "plastic", "wicker"]),
    "table": ("tables", True, ["wooden", "glass", "marble", "metal"]),
    "sofa": ("sofas", True, ["leather", "velvet"]),
    "armchair": ("armchairs", True, ["leather", "velvet"]),
    "bench": ("benches", True, ["wooden", "stone", "metal"]),
    "bookshelf": ("bookshelves", True, ["wooden"]),
    "desk": ("desks", True, ["wooden", "metal"]),
    "bed": ("beds", True, ["wooden"]),
    "door": ("doors", True, ["wooden", "metal", "glass"]),
    "window": ("windows", False, []),
    "staircase": ("staircases", False, ["wooden", "stone", "spiral"]),
    "cup": ("cups", True, ["ceramic", "paper", "porcelain"]),
    "mug": ("mugs", True, ["ceramic", "enamel"]),
    "teapot": ("teapots", True, ["ceramic", "porcelain", "cast iron"]),
    "bowl": ("bowls", True, ["ceramic", "wooden", "glass"]),
    "plate": ("plates", True, ["ceramic", "porcelain"]),
    "vase": ("vases", True, ["glass", "ceramic", "porcelain", "clay"]),
    "bottle": ("bottles", True, ["glass", "plastic"]),
    "jar": ("jars", False, ["glass", "clay"]),
    "basket": ("baskets", False, ["wicker", "woven"]),
    "kettle": ("kettles", True, ["metal", "copper"]),
    "frying pan": ("frying pans", False, ["cast iron", "copper"]),
    "spoon": ("spoons", False, ["wooden", "silver", "plastic"]),
    "hat": ("hats", True, ["straw", "wool", "felt"]),
    "scarf": ("scarves", True, ["wool", "silk"]),
    "jacket": ("jackets", True, ["leather", "denim"]),
    "dress": ("dresses", True, ["silk", "cotton", "lace"]),
    "pair of shoes": ("pairs of shoes", True, ["leather"]),
    "pair of boots": ("pairs of boots", True, ["leather", "rubber"]),
    "sweater": ("sweaters", True, ["wool", "knitted"]),
    "umbrella": ("umbrellas", True, []),
    "backpack": ("backpacks", True, ["canvas", "leather"]),
    "handbag": ("handbags", True, ["leather"]),
    "pair of gloves": ("pairs of gloves", True, ["leather", "wool"]),
    "t-shirt": ("t-shirts", True, ["cotton"]),
    "laptop": ("laptops", True, []),
    "smartphone": ("smartphones", True, []),
    "camera": ("cameras", True, []),
    "television": ("televisions", False, []),
    "pair of headphones": ("pairs of headphones", True, []),
    "keyboard": ("keyboards", True, []),
    "clock": ("clocks", True, ["wooden", "brass"]),
    "lamp": ("lamps", True, ["brass", "glass", "paper"]),
    "radio": ("radios", True, []),
    "microphone": ("microphones", False, []),
    "guitar": ("guitars", True, ["acoustic", "electric"]),
    "piano": ("pianos", True, ["grand", "upright"]),
    "violin": ("violins", False, []),
    "drum": ("drums", True, []),
    "trumpet": ("trumpets", False, ["brass"]),
    "book": ("books", True, ["old", "leather-bound"]),
    "notebook": ("notebooks", True, []),
    "candle": ("candles", True, ["wax"]),
    "mirror": ("mirrors", False, ["round", "antique"]),
    "key": ("keys", False, ["brass", "iron"]),
    "coin": ("coins", False, ["gold", "silver", "copper"]),
    "wristwatch": ("wristwatches", True, ["gold", "silver"]),
    "ring": ("rings", False, ["gold", "silver", "diamond"]),
    "necklace": ("necklaces", False, ["gold", "pearl", "beaded"]),
    "flag": ("flags", True, []),
    "globe": ("globes", False, []),
    "chessboard": ("chessboards", False, ["wooden", "marble"]),
    "bell": ("bells", False, ["bronze", "brass"]),
    "tent": ("tents", True, []),
    "trophy": ("trophies", False, ["gold", "silver"]),
    "suitcase": ("suitcases", True, ["leather", "vintage"]),
    "teddy bear": ("teddy bears", True, []),
    "ball": ("balls", True, ["rubber", "leather"]),
    "kite": ("kites", True, []),
    "balloon": ("balloons", True, []),
    "hammer": ("hammers", False, []),
    "ladder": ("ladders", False, ["wooden", "aluminum"]),
    "shovel": ("shovels", False, []),
    "paintbrush": ("paintbrushes", False, []),
    "bucket": ("buckets", True, ["metal", "plastic"]),
    "fence": ("fences", True, ["wooden", "iron", "stone"]),
    "mailbox": ("mailboxes", True, []),
    "traffic light": ("traffic lights", False, []),
    "street lamp": ("street lamps", False, []),
    "fire hydrant": ("fire hydrants", True, []),
    "bridge": ("bridges", False, ["stone", "wooden", "steel"]),
    "lantern": ("lanterns", True, ["paper", "brass"]),
    "skateboard": ("skateboards", True, []),
    "surfboard": ("surfboards", True, []),
    "pair of sunglasses": ("pairs of sunglasses", False, []),
    "toy robot": ("toy robots", True, []),
    "doll": ("dolls", False, ["porcelain", "rag"]),
    "pillow": ("pillows", True, ["silk", "embroidered"]),
    "blanket": ("blankets", True, ["wool", "knitted", "patchwork"]),
    "rug": ("rugs", True, ["woven", "Persian"]),
    "curtain": ("curtains", True, ["lace", "velvet"]),
    "sculpture": ("sculptures", False, ["marble", "bronze", "wooden", "clay"]),
}
_FOOD = [
    ("apple", "apples"), ("banana", "bananas"), ("orange", "oranges"),
    ("strawberry", "strawberries"), ("pizza", "pizzas"), ("birthday cake", "birthday cakes"),
    ("sandwich", "sandwiches"), ("loaf of bread", "loaves of bread"),
    ("cup of coffee", "cups of coffee"), ("bowl of soup", "bowls of soup"),
    ("plate of sushi", "plates of sushi"), ("salad", "salads"),
    ("ice cream cone", "ice cream cones"), ("cookie", "cookies"), ("burger", "burgers"),
    ("pineapple", "pineapples"), ("watermelon", "watermelons"), ("bunch of grapes",
                                                                   "bunches of grapes"),
    ("carrot", "carrots"), ("tomato", "tomatoes"), ("pumpkin", "pumpkins"),
    ("lemon", "lemons"), ("egg", "eggs"), ("wheel of cheese", "wheels of cheese"),
    ("croissant", "croissants"), ("plate of pasta", "plates of pasta"),
    ("bowl of ramen", "bowls of ramen"), ("taco", "tacos"), ("donut", "donuts"),
    ("cupcake", "cupcakes"), ("pie", "pies"), ("glass of wine", "glasses of wine"),
    ("glass of orange juice", "glasses of orange juice"), ("cup of tea", "cups of tea"),
    ("bowl of cereal", "bowls of cereal"), ("chocolate bar", "chocolate bars"),
    ("pear", "pears"), ("cherry", "cherries"), ("avocado", "avocados"),
    ("mushroom", "mushrooms"), ("pepper", "peppers"), ("onion", "onions"),
    ("bowl of rice", "bowls of rice"), ("steak", "steaks"), ("fish fillet", "fish fillets"),
    ("plate of dumplings", "plates of dumplings"), ("bagel", "bagels"),
    ("pancake stack", "pancake stacks"), ("coconut", "coconuts"), ("mango", "mangoes"),
]
_PRODUCE = {"apple", "banana", "orange", "strawberry", "pineapple", "watermelon",
            "bunch of grapes", "carrot", "tomato", "pumpkin", "lemon", "pear", "cherry",
            "avocado", "mushroom", "pepper", "onion", "coconut", "mango"}
_DRINKS = {"cup of coffee", "glass of wine", "glass of orange juice", "cup of tea"}
_FOOD_ADJ = {"produce": ["fresh", "ripe", "sliced", "rotten", "half-eaten", "shiny"],
             "dish": ["homemade", "delicious-looking", "half-eaten", "freshly made",
                      "beautifully plated"],
             "drink": ["full", "half-empty"]}
_FOOD_PLACES = {"produce": ["on a wooden table", "at a street market", "on a kitchen counter",
                            "in a fruit bowl", "in a supermarket"],
                "dish": ["on a wooden table", "in a restaurant", "on a kitchen counter",
                         "at a picnic", "on a breakfast tray"],
                "drink": ["on a cafe table", "on a desk", "on a wooden table", "at a bar"]}

_ANIMALS = {
    # noun: (plural, group, kind)
    "dog": ("dogs", "a pack of", "pet"), "cat": ("cats", "a group of", "pet"),
    "puppy": ("puppies", "a litter of", "pet"), "kitten": ("kittens", "a litter of", "pet"),
    "rabbit": ("rabbits", "a group of", "pet"), "hamster": ("hamsters", "a pair of", "pet"),
    "parrot": ("parrots", "a flock of", "bird"), "goldfish": ("goldfish", "a bowl of", "sea"),
    "cow": ("cows", "a herd of", "farm"), "horse": ("horses", "a herd of", "farm"),
    "sheep": ("sheep", "a flock of", "farm"), "goat": ("goats", "a herd of", "farm"),
    "pig": ("pigs", "a group of", "farm"), "chicken": ("chickens", "a flock of", "farm"),
    "duck": ("ducks", "a flock of", "bird"), "donkey": ("donkeys", "a pair of", "farm"),
    "llama": ("llamas", "a herd of", "farm"), "lion": ("lions", "a pride of", "wild"),
    "tiger": ("tigers", "a pair of", "wild"), "elephant": ("elephants", "a herd of", "wild"),
    "giraffe": ("giraffes", "a group of", "wild"), "zebra": ("zebras", "a herd of", "wild"),
    "bear": ("bears", "a family of", "wild"), "polar bear": ("polar bears", "a pair of",
                                                             "wild"),
    "wolf": ("wolves", "a pack of", "wild"), "fox": ("foxes", "a family of", "wild"),
    "deer": ("deer", "a herd of", "wild"), "monkey": ("monkeys", "a troop of", "wild"),
    "gorilla": ("gorillas", "a family of", "wild"), "kangaroo": ("kangaroos", "a mob of",
                                                                 "wild"),
    "koala": ("koalas", "a pair of", "wild"), "panda": ("pandas", "a pair of", "wild"),
    "hippopotamus": ("hippos", "a group of", "wild"), "rhinoceros": ("rhinos", "a pair of",
                                                                     "wild"),
    "cheetah": ("cheetahs", "a pair of", "wild"), "leopard": ("leopards", "a pair of", "wild"),
    "camel": ("camels", "a caravan of", "wild"), "moose": ("moose", "a pair of", "wild"),
    "squirrel": ("squirrels", "a pair of", "wild"), "raccoon": ("raccoons", "a family of",
                                                                "wild"),
    "hedgehog": ("hedgehogs", "a family of", "wild"), "owl": ("owls", "a pair of", "bird"),
    "eagle": ("eagles", "a pair of", "bird"), "penguin": ("penguins", "a colony of", "bird"),
    "flamingo": ("flamingos", "a flock of", "bird"), "swan": ("swans", "a pair of", "bird"),
    "peacock": ("peacocks", "a pair of", "bird"), "hummingbird": ("hummingbirds", "a pair of",
                                                                  "bird"),
    "pelican": ("pelicans", "a flock of", "bird"), "seagull": ("seagulls", "a flock of",
                                                               "bird"),
    "crow": ("crows", "a flock of", "bird"), "robin": ("robins", "a pair of", "bird"),
    "dolphin": ("dolphins", "a pod of", "sea"), "whale": ("whales", "a pod of", "sea"),
    "shark": ("sharks", "a group of", "sea"), "octopus": ("octopuses", "a pair of", "sea"),
    "jellyfish": ("jellyfish", "a bloom of", "sea"), "sea turtle": ("sea turtles", "a pair of",
                                                                    "sea"),
    "crab": ("crabs", "a group of", "shore"), "starfish": ("starfish", "a group of", "shore"),
    "seal": ("seals", "a colony of", "shore"), "clownfish": ("clownfish", "a pair of", "sea"),
    "butterfly": ("butterflies", "a swarm of", "insect"), "bee": ("bees", "a swarm of",
                                                                  "insect"),
    "ladybug": ("ladybugs", "a group of", "insect"), "dragonfly": ("dragonflies", "a pair of",
                                                                   "insect"),
    "spider": ("spiders", "a pair of", "insect"), "snail": ("snails", "a pair of", "insect"),
    "frog": ("frogs", "a group of", "reptile"), "lizard": ("lizards", "a pair of", "reptile"),
    "snake": ("snakes", "a pair of", "reptile"), "crocodile": ("crocodiles", "a group of",
                                                               "reptile"),
    "turtle": ("turtles", "a group of", "reptile"), "chameleon": ("chameleons", "a pair of",
                                                                  "reptile"),
}
_ANIMAL_ACTIONS = {
    "pet": ["sleeping on a couch", "playing with a ball", "looking at the camera",
            "sitting by a window", "lying on a rug", "running in a backyard",
            "curled up in a basket", "wearing a small sweater", "eating from a bowl",
            "jumping in the air", "hiding under a bed", "being held by a child"],
    "farm": ["grazing in a green pasture", "standing in a barn", "behind a wooden fence",
             "walking along a dirt road", "eating hay", "standing in the mud",
             "in a field at sunset", "being fed by a farmer"],
    "wild": ["walking through tall grass", "resting in the shade of a tree",
             "drinking from a river", "standing in the snow", "in a zoo enclosure",
             "looking straight at the camera", "running across the savanna",
             "hiding among the trees", "with its young", "climbing a rocky hill"],
    "bird": ["perched on a branch", "flying over the water", "sitting in its nest",
             "spreading its wings", "standing on one leg", "flying against a blue sky",
             "on a telephone wire", "wading in shallow water"],
    "sea": ["swimming in clear blue water", "near a coral reef", "in an aquarium",
            "swimming in the deep ocean", "jumping out of the water"],
    "shore": ["on a sandy beach", "on a rock by the sea", "in a tide pool",
              "lying on the shore"],
    "insect": ["on a flower", "on a green leaf", "on a window pane", "in a garden",
               "on a blade of grass"],
    "reptile": ["on a rock", "in the mud", "on a tree branch", "by a pond",
                "basking in the sun"],
}

_PEOPLE = [
    "a young woman", "an elderly man", "an elderly woman", "a little girl", "a little boy",
    "a teenage boy", "a teenage girl", "a middle-aged man", "a young man",
    "a group of friends", "a family", "a couple", "a crowd of people", "two children",
    "a grandmother and her grandson", "a father and his daughter", "a mother and her baby",
    "a group of teenagers", "an old couple",
]
_PEOPLE_ACTIONS = [
    "smiling at the camera", "laughing together", "reading a book", "walking a dog",
    "riding a bicycle", "cooking in a kitchen", "playing the guitar", "talking on the phone",
    "sitting on a park bench", "dancing at a party", "waving hello", "taking a selfie",
    "carrying shopping bags", "jogging in a park", "swimming in a pool", "eating dinner",
    "walking in the rain with an umbrella", "sleeping on a sofa", "working on a laptop",
    "hiking in the mountains", "playing in the snow", "building a sandcastle",
    "looking out of a window", "crossing a busy street", "painting a picture",
    "having a picnic", "celebrating a birthday", "waiting at a bus stop",
    "sitting around a campfire", "playing a board game",
]
_PROFESSIONS = {
    "a chef": ["cooking in a restaurant kitchen", "chopping vegetables",
               "plating a dish"],
    "a doctor": ["in a hospital hallway", "talking to a patient", "wearing a white coat"],
    "a nurse": ["caring for a patient", "in a hospital room"],
    "a firefighter": ["spraying water on a fire", "standing next to a fire truck"],
    "a farmer": ["driving a tractor", "harvesting vegetables", "feeding chickens"],
    "a musician": ["playing on stage", "playing the violin", "playing the drums"],
    "a painter": ["working at an easel", "painting a wall"],
    "a soldier": ["in uniform", "standing guard"],
    "a police officer": ["directing traffic", "standing on a street corner"],
    "a teacher": ["writing on a blackboard", "reading to children"],
    "a student": ["studying in a library", "taking notes in class"],
    "a construction worker": ["wearing a hard hat", "on a building site"],
    "a scientist": ["looking through a microscope", "working in a laboratory"],
    "an athlete": ["running on a track", "lifting weights"],
    "a surfer": ["riding a big wave", "carrying a surfboard on the beach"],
    "a skier": ["racing down a snowy slope", "on a ski lift"],
    "a cyclist": ["riding on a mountain trail", "racing on a road"],
    "a fisherman": ["casting a net from a boat", "fishing on a lake at dawn"],
    "a businessman": ["in a suit walking to work", "giving a presentation"],
    "a dancer": ["performing ballet on stage", "dancing in a studio"],
    "a mechanic": ["repairing a car engine", "working in a garage"],
    "a pilot": ["in the cockpit of a plane"],
    "an astronaut": ["floating in space", "in a space suit"],
    "a baker": ["taking bread out of an oven", "kneading dough"],
    "a gardener": ["planting flowers", "watering a garden"],
    "a photographer": ["taking pictures outdoors", "holding a camera"],
    "a street vendor": ["selling fruit at a market", "cooking food on a street stall"],
    "a bride and groom": ["at their wedding", "dancing at their wedding"],
    "a football player": ["kicking a ball", "celebrating a goal"],
    "a basketball player": ["jumping to dunk the ball"],
    "a tennis player": ["serving the ball"],
    "a monk": ["meditating in a temple"],
}
_PORTRAIT_TRAITS = [
    "with curly red hair", "with glasses", "with a long gray beard", "wearing a hat",
    "with freckles", "wearing a hijab", "with tattoos", "wearing traditional clothing",
    "with blue eyes", "wearing a suit and tie", "with short black hair", "wearing a helmet",
    "with face paint", "wearing headphones", "with a serious expression",
    "with a big smile", "with braided hair", "wearing a uniform", "in a wheelchair",
    "with wrinkles", "with a shaved head", "wearing sunglasses", "with a flower crown",
    "wearing a mask",
]

_INDOOR = [
    "a cozy living room", "a modern kitchen", "a crowded classroom", "a hospital corridor",
    "an empty office", "a quiet library", "a museum gallery", "a small restaurant",
    "a bakery", "a supermarket aisle", "a gym", "a child's bedroom", "a bathroom",
    "a subway car", "a train station", "an airport terminal", "a church interior",
    "a theater stage", "a factory floor", "a laboratory", "a garage", "a carpenter's workshop",
    "a coffee shop", "a bar", "a hotel lobby", "a spiral staircase", "a dusty attic",
    "a basement", "a concert hall", "a bookstore", "a clothing store", "a waiting room",
    "a server room", "an art studio", "a greenhouse", "a dining room", "a hallway",
    "a conference room", "a swimming pool", "a prison cell", "a shopping mall",
    "a recording studio", "a barn interior", "a cathedral", "a mosque interior",
    "a temple interior", "a kitchen at a restaurant", "a hospital room", "a nursery",
    "a home office",
]
_OUTDOOR = [
    "a busy city street", "a narrow alley", "a town square", "a city skyline",
    "a parking lot", "a playground", "a harbor", "an outdoor market",
    "a suburban neighborhood", "a construction site", "a highway", "a rooftop terrace",
    "a railway track", "a lighthouse", "a medieval castle", "a farm", "a red barn",
    "a small village", "a campsite", "a football stadium", "a city park", "a flower garden",
    "a cemetery", "a gas station", "a port with cargo ships", "a train platform",
    "a skyscraper", "an old stone bridge", "a suspension bridge", "a fountain",
    "a country road", "a boardwalk", "a pier", "a ski resort", "a marina", "an amusement park",
    "a vineyard", "an orchard", "a golf course", "a tennis court", "a basketball court",
    "a zoo", "a botanical garden", "a crossroads", "a street with parked cars",
    "a row of houses", "a factory with smokestacks", "a windmill", "a water tower",
    "a train yard",
]
_PLACE_MODS = [
    "at night", "in the rain", "at dawn", "covered in snow", "during rush hour",
    "on a sunny day", "in the fog", "at sunset", "decorated for a holiday", "full of people",
    "completely empty", "lit by street lights", "in autumn", "after a storm",
]
_INDOOR_MODS = ["at night", "full of people", "completely empty", "decorated for a holiday",
                "in warm light", "in the morning light"]
_PLACE_PATTERNS = [
    "A photo of {p}", "{P}", "{P} {m}", "Image of {p} {m}", "An empty view of {p}",
    "A wide shot of {p}", "A photo of {p} {m}",
]

_LANDSCAPES = [
    "snowy mountains", "a desert", "a dense forest", "a tropical jungle", "a sandy beach",
    "a waterfall", "a calm lake", "a winding river", "a deep canyon", "a glacier",
    "a volcano", "a green valley", "a meadow of wildflowers", "rocky cliffs by the sea",
    "a small island", "the savanna", "a swamp", "rice terraces", "sand dunes",
    "a coral reef", "a cave", "a field of sunflowers", "a lavender field", "a bamboo forest",
    "an autumn forest", "the arctic tundra", "a fjord", "a hot spring", "rolling hills",
    "a pine forest", "a wheat field", "a rocky coastline", "a mountain lake", "a salt flat",
    "a rainforest", "a frozen lake", "a marsh", "a prairie", "a steep gorge", "a lagoon",
]
_LANDSCAPE_MODS = [
    "at sunset", "under a starry sky", "in thick fog", "covered in snow", "in spring",
    "after the rain", "seen from above", "at sunrise", "under a stormy sky",
    "on a clear day", "with dramatic clouds", "in golden light", "at dusk",
]

_COUNTRIES = [
    "Japan", "Italy", "France", "Spain", "Greece", "Morocco", "Egypt", "India", "China",
    "Thailand", "Vietnam", "Indonesia", "Mexico", "Peru", "Brazil", "Argentina", "Chile",
    "Canada", "the United States", "Iceland", "Norway", "Sweden", "Finland", "Scotland",
    "Ireland", "England", "Germany", "the Netherlands", "Switzerland", "Austria", "Portugal",
    "Turkey", "Russia", "Kenya", "Tanzania", "South Africa", "Nigeria", "Ethiopia",
    "Australia", "New Zealand", "South Korea", "Nepal", "Mongolia", "Cuba", "Colombia",
    "Jordan", "Iran", "Poland", "Croatia", "the Philippines", "Cambodia", "Madagascar",
]
_CITIES = [
    "Paris", "Tokyo", "New York", "London", "Rome", "Venice", "Barcelona", "Istanbul",
    "Cairo", "Mumbai", "Beijing", "Hong Kong", "Bangkok", "Rio de Janeiro", "Buenos Aires",
    "Mexico City", "San Francisco", "Chicago", "Moscow", "Amsterdam", "Prague", "Vienna",
    "Kyoto", "Seoul", "Sydney", "Dubai", "Marrakech", "Havana", "Lisbon", "Berlin",
    "Singapore", "Cape Town", "Jerusalem", "Athens", "Stockholm", "Edinburgh", "Hanoi",
    "Lima", "Toronto", "Los Angeles",
]
_COUNTRY_PATTERNS = [
    "A photo taken in {c}", "A street scene in {c}", "Traditional architecture in {c}",
    "The countryside of {c}", "A local market in {c}", "Traditional food from {c}",
    "A village in {c}", "A landscape in {c}", "People in traditional dress from {c}",
    "A famous landmark in {c}",
]
_CITY_PATTERNS = [
    "A street in {c}", "The skyline of {c}", "A photo of {c} at night",
    "A famous landmark in {c}", "A busy square in {c}", "Aerial view of {c}",
    "A cafe in {c}", "Rooftops of {c}",
]

_TEXTURES = [
    "rough tree bark", "smooth polished stone", "wrinkled paper", "rusty metal",
    "peeling paint", "cracked earth", "woven fabric", "knitted wool", "soft fur",
    "feathers", "fish scales", "snake skin", "tangled ropes", "shattered glass",
    "rippling water", "sand ripples", "frost on a window", "moss on a rock", "honeycomb",
    "a brick wall", "cobblestones", "a wooden floor", "marble veins", "crumpled aluminum foil",
    "soap bubbles", "a spider web", "lichen", "corrugated metal", "velvet", "burlap",
    "leather", "a gravel path", "dry leaves", "ice crystals", "pebbles", "wet asphalt",
    "a tiled floor", "lace", "denim", "a concrete wall",
]
_TEXTURE_ADJ = ["rough", "smooth", "glossy", "matte", "grainy", "fluffy", "bumpy", "shiny",
                "porous", "fuzzy", "silky", "coarse", "metallic", "wrinkled", "scaly",
                "sticky-looking", "jagged", "velvety", "crinkled", "slimy"]
_PATTERNS = ["striped", "polka dot", "checkered", "plaid", "floral", "zigzag", "paisley",
             "geometric", "camouflage", "leopard print", "herringbone", "houndstooth",
             "tie-dye", "honeycomb", "chevron", "tartan", "marbled", "mosaic"]

_SHAPES = [
    "circles", "squares", "triangles", "stars", "hexagons", "spirals", "diamonds",
    "rectangles", "ovals", "crescents", "hearts", "crosses", "arrows", "rings", "cubes",
    "spheres", "pyramids", "cylinders", "waves", "zigzags", "dots", "concentric circles",
    "curved lines", "straight lines", "diagonal lines", "grids", "arches", "cones",
]
_SHAPE_PATTERNS = [
    "An image with {s}", "A pattern of {s}", "Abstract art made of {s}",
    "A composition of colorful {s}", "Simple {s} on a plain background",
]
_SHAPE_EXTRA = [
    "A symmetrical composition", "An asymmetrical composition", "A perfectly round object",
    "Sharp angles and straight edges", "Soft rounded shapes", "A repeating geometric pattern",
    "A circular window", "A triangular roof", "A square tile",
    "A spiral staircase seen from above", "A star-shaped cookie", "A heart-shaped balloon", "An arched doorway",
    "A round table", "A long narrow corridor", "A tall thin tower", "A wide flat plain",
    "Fractal patterns", "An optical illusion", "A labyrinth seen from above",
]

_MATERIALS = [
    "wood", "metal", "glass", "plastic", "stone", "marble", "concrete", "clay", "paper",
    "cardboard", "leather", "silk", "cotton", "wool", "copper", "brass", "gold", "silver",
    "steel", "iron", "bronze", "porcelain", "rubber", "bamboo", "wicker", "ice", "wax",
    "chocolate", "Lego bricks", "crystal", "granite", "terracotta", "felt", "velvet",
]
_MATERIAL_PATTERNS = ["An object made of {m}", "A close-up of {m}", "A surface of {m}",
                      "Something carved out of {m}", "A sculpture made of {m}"]

_COUNTABLE = [
    # singular, plural, a fitting place
    ("dog", "dogs", "in a park"), ("cat", "cats", "on a sofa"),
    ("apple", "apples", "on a table"), ("car", "cars", "on the street"),
    ("bird", "birds", "on a wire"), ("horse", "horses", "in a field"),
    ("child", "children", "on a playground"), ("person", "people", "on a beach"),
    ("chair", "chairs", "in a row"), ("cup", "cups", "on a shelf"),
    ("book", "books", "on a shelf"), ("tree", "trees", "on a hill"),
    ("boat", "boats", "in a harbor"), ("flower", "flowers", "in a vase"),
    ("balloon", "balloons", "in the sky"), ("candle", "candles", "on a cake"),
    ("house", "houses", "along a street"), ("bottle", "bottles", "on a bar counter"),
    ("egg", "eggs", "in a basket"), ("duck", "ducks", "on a pond"),
    ("window", "windows", "on a facade"), ("bicycle", "bicycles", "parked by a wall"),
    ("cow", "cows", "in a meadow"), ("sheep", "sheep", "on a hillside"),
    ("umbrella", "umbrellas", "on a beach"), ("lamp", "lamps", "hanging from a ceiling"),
    ("coin", "coins", "on a table"), ("key", "keys", "on a ring"),
    ("orange", "oranges", "in a bowl"), ("penguin", "penguins", "on the ice"),
]
_NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
            "twelve", "twenty", "a hundred"]
_QUANTIFIERS = ["many", "a few", "several", "lots of"]

_STYLES = [
    "a pencil sketch", "an oil painting", "a watercolor painting", "a cartoon",
    "a 3D render", "pixel art", "a black and white photograph", "a vintage photograph",
    "a child's drawing", "a charcoal drawing", "a pastel drawing", "an ink drawing",
    "a woodcut print", "a linocut", "a digital illustration", "an anime-style drawing",
    "a comic book illustration", "a claymation still", "a low-poly render", "a vector graphic",
    "a collage", "a mosaic", "a stained glass window", "an embroidery", "a graffiti mural",
    "a tattoo design", "a blueprint", "a technical drawing", "a children's book illustration",
    "a Polaroid photo", "an infrared photograph", "a sepia photograph", "a long exposure photo",
    "a macro photograph", "a tilt-shift photo", "a double exposure photo", "a paper cutout",
    "an origami model", "a sand sculpture", "an ice sculpture", "a chalk drawing",
    "a neon sign", "a poster", "a postage stamp", "a botanical illustration",
]
_STYLE_SUBJECTS = [
    "a cat", "a city street", "a mountain landscape", "a woman's face", "flowers in a vase",
    "a sailing ship", "a bowl of fruit", "an old man", "a forest", "a horse", "a house",
    "a dragon", "a bird", "the sea", "a car", "a robot", "a castle", "a tree",
]
_STYLE_ONLY = [
    "Vibrant watercolor painting", "Minimalist line art", "Grainy film photograph",
    "Photorealistic rendering", "Abstract painting with bold brushstrokes",
    "Soft pastel illustration", "High-contrast black and white photo",
    "Heavily edited photo with filters", "Hand-drawn doodle", "Quick rough sketch",
    "Detailed architectural drawing", "Retro 1980s style graphic", "Art made of cut paper",
    "Product photo on a white background", "Stock photo", "Screenshot of a video game",
    "Screenshot of a website", "Screenshot of a phone", "A movie poster", "An album cover",
    "A postcard", "An old newspaper clipping", "A page from a comic book", "A map",
    "A diagram with labels", "A chart with bars", "A company logo", "A meme with text",
    "A page of handwritten notes", "A scanned document", "An X-ray image",
    "A microscope image", "A satellite photo", "Security camera footage",
    "A blurry photo taken in motion", "An out-of-focus photo", "A selfie",
    "A photo with a fisheye lens", "An overexposed photo", "A dark underexposed photo",
    "A photo with heavy vignetting", "A snapshot taken with a phone", "A professional photo",
    "A photo from the 1950s", "A photo from the 1970s", "A glitch art image",
    "A hologram", "A sticker", "An emoji", "A tarot card illustration", "A playing card",
    "A children's coloring page", "A spray-painted stencil", "A cross-stitch pattern",
    "A mural on a building", "A painted ceramic tile", "A medieval manuscript illustration",
    "A cave painting", "Egyptian hieroglyphs", "A Chinese ink painting", "A Persian miniature",
    "Japanese calligraphy", "A tapestry", "A quilt", "A wax seal", "A vintage advertisement",
    "A propaganda poster", "A wanted poster", "A birthday card", "A wedding invitation",
    "A page of sheet music", "A crossword puzzle", "A board game", "A jigsaw puzzle",
    "A LEGO model", "A miniature model", "A diorama", "A puppet", "A mannequin",
    "A wax figure", "A statue", "A painted portrait",
]

_MOODS = [
    "serene", "peaceful", "gloomy", "joyful", "melancholic", "mysterious", "eerie",
    "romantic", "nostalgic", "chaotic", "tense", "dreamy", "cheerful", "lonely", "festive",
    "calm", "dramatic", "cozy", "playful", "somber", "hopeful", "ominous", "whimsical",
    "energetic", "tranquil", "spooky", "solemn", "magical", "bleak", "lively",
]
_MOOD_SCENES = [
    "landscape", "street scene", "portrait", "forest", "beach", "interior", "city at night",
    "room", "garden", "village",
]
_MOOD_EXTRA = [
    "A joyful celebration", "A lonely figure walking on an empty road", "A scary haunted house",
    "A tense moment in a sports game", "A peaceful morning by the lake",
    "A romantic dinner by candlelight", "A chaotic traffic jam", "A sad child crying",
    "An angry man shouting", "A surprised face", "A person deep in thought",
    "A couple hugging", "Friends cheering", "A crowd protesting in the street",
    "A quiet moment of prayer", "A dreamy, hazy atmosphere", "A feeling of freedom",
    "A sense of danger", "A nostalgic summer memory", "A cozy winter evening at home",
]

_LIGHTING = [
    "soft natural light", "harsh midday sun", "golden hour light", "a backlit silhouette",
    "neon lights", "candlelight", "dramatic shadows", "studio lighting", "dim lighting",
    "light streaming through a window", "sun rays through the trees",
    "reflections on wet pavement", "a spotlight", "lens flare", "moonlight",
    "warm lamplight", "cold fluorescent light", "colorful stage lights", "firelight",
    "strong contrast between light and shadow", "diffuse overcast light", "blue hour light",
    "a glowing sunset", "fairy lights", "the glow of a screen",
]
_LIGHT_SUBJECTS = ["a portrait", "a city street", "a room", "a forest", "a face",
                   "a still life", "a kitchen", "a statue"]

_WEATHER = [
    ("rainy", "on a rainy day"), ("snowy", "on a snowy day"), ("foggy", "on a foggy morning"),
    ("stormy", "during a storm"), ("sunny", "on a sunny afternoon"),
    ("cloudy", "under an overcast sky"), ("windy", "on a windy day"),
    ("thundery", "during a thunderstorm"), ("misty", "at a misty dawn"),
    ("icy", "on a freezing winter day"), ("hazy", "on a hazy summer day"),
    ("sweltering", "during a heatwave"),
]
_WEATHER_EXTRA = [
    "A rainbow after the rain", "Lightning striking at night", "Heavy rain on a window",
    "Snowflakes falling", "A blizzard", "Hailstones on the ground", "Dark storm clouds",
    "A tornado in the distance", "Frost on the grass", "Puddles on the street",
    "Fluffy white clouds in a blue sky", "Sunshine breaking through the clouds",
    "A sandstorm in the desert", "Icicles hanging from a roof", "Wind bending the trees",
    "A clear blue sky", "Fog rolling over hills", "A double rainbow", "Dew drops on leaves",
    "A flooded street",
]
_WEATHER_SCENES = ["street", "forest", "beach", "city", "village", "field", "harbor",
                   "mountain road", "park", "lake"]

_TIMES = ["at dawn", "at sunrise", "in the early morning", "at noon", "in the afternoon",
          "at golden hour", "at sunset", "at dusk", "at twilight", "at night", "at midnight",
          "during the blue hour"]
_TIME_SCENES = ["a city skyline", "a beach", "a mountain range", "a farm", "a harbor",
                "a quiet street", "a desert", "a lake", "a forest", "a bridge"]

_MOVEMENTS = [
    # adjective (None: only "in the style of"), name
    ("impressionist", "Impressionism"), ("cubist", "Cubism"), ("surrealist", "Surrealism"),
    ("pop art", "Pop Art"), ("Art Nouveau", "Art Nouveau"), ("Art Deco", "Art Deco"),
    ("baroque", "the Baroque"), ("Renaissance", "the Renaissance"),
    ("abstract expressionist", "Abstract Expressionism"), ("minimalist", "Minimalism"),
    ("pointillist", "Pointillism"), ("expressionist", "Expressionism"),
    ("Romantic", "Romanticism"), ("realist", "Realism"), ("ukiyo-e", "ukiyo-e"),
    ("Bauhaus", "the Bauhaus"), ("Gothic", "Gothic art"), ("futurist", "Futurism"),
    ("Dada", "Dadaism"), ("fauvist", "Fauvism"), ("Byzantine", "Byzantine art"),
    ("constructivist", "Constructivism"), ("rococo", "Rococo"),
    ("neoclassical", "Neoclassicism"), ("psychedelic", "psychedelic art"),
    ("op art", "Op Art"), ("folk art", "folk art"), (None, "Aboriginal dot painting"),
    (None, "street art"), (None, "outsider art"),
]
_MOVEMENT_SUBJECTS = ["portrait", "landscape", "still life", "city scene", "poster",
                      "painting of a woman", "painting of flowers", "sculpture"]

_VIEWS_LARGE = [
    "Aerial view of {x}", "A bird's-eye view of {x}", "A wide-angle shot of {x}",
    "A top-down view of {x}", "A panoramic view of {x}", "A drone shot of {x}",
    "A satellite image of {x}", "A photo of {x} taken from far away",
    "A reflection of {x} in the water",
]
_VIEWS_SMALL = [
    "A close-up of {x}", "A low-angle shot of {x}", "A side view of {x}",
    "A fisheye view of {x}", "A view of {x} through a window", "A view of {x} from below",
    "A view of {x} from behind", "A blurry photo of {x} in motion",
]
_VIEW_LARGE_SUBJECTS = ["a city", "a forest", "a crowded beach", "a highway interchange",
                        "a river delta", "a stadium", "a farm", "a harbor", "a village",
                        "a mountain range", "an island", "a desert road"]
_VIEW_SMALL_SUBJECTS = ["a person", "a dog", "a car", "a tree", "a skyscraper", "a cathedral",
                        "a horse", "a child", "a statue", "a bicycle", "a flower", "a cat"]
_VIEW_EXTRA = [
    "An underwater view", "A view from an airplane window", "A view from the top of a tower",
    "A point-of-view shot from a bicycle", "A photo taken through a keyhole",
    "A view through binoculars", "A view through a microscope", "A view from a car window",
    "A first-person view of hands holding a phone", "A view looking straight up at the sky",
    "A symmetrical view down a long corridor", "A view over the shoulder of a person",
    "A mirror selfie", "An extreme close-up of an eye", "A photo framed by an archway",
]

# the shapes world of clipdecomp.toy: words its word-level tokenizer knows
_TOY_SHAPES = ["circle", "square", "triangle", "star", "cross", "heart", "diamond", "hexagon"]
_TOY_COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink"]
_TOY_SIZES = ["small", "large", "tiny", "big", "little"]
_TOY_POSITIONS = ["top left", "top", "top right", "left", "center", "middle", "right",
                  "bottom left", "bottom", "bottom right"]
_TOY_GROUNDS = ["water", "grass", "sand", "sky", "brick", "wood", "the sea", "a lawn",
                "a beach", "a blue sky", "a brick wall", "a wooden floor", "wooden planks"]
_TOY_BG_WORDS = ["water", "grass", "sand", "sky", "brick", "wood"]
_TOY_PREPS = ["on", "over", "in front of", "against"]
_TOY_COUNTS = ["one", "two", "three"]


# --------------------------------------------------------------------------- generators
def _sample(rng: random.Random, items: list[str], k: int) -> list[str]:
    items = list(dict.fromkeys(items))
    return items if len(items) <= k else rng.sample(items, k)


def _objects(rng: random.Random) -> list[str]:
    out = []
    for noun, (plural, colourable, materials) in _OBJECTS.items():
        out.append(f"A photo of {_a(noun)}")
        if colourable:
            for color in rng.sample(_COLORS, 3):
                pattern = rng.choice(["A photo of {}", "{}", "Image of {}", "A close-up of {}"])
                out.append(_cap(pattern.format(_a(f"{color} {noun}"))))
        for mat in materials[:3]:
            out.append(_cap(_a(f"{mat} {noun}")))
        out.append(_cap(rng.choice(["an old", "a brand new", "a broken", "a tiny",
                                    "a giant", "a dusty", "a shiny"]) + " " + noun))
        out.append(f"{rng.choice(['Two', 'Several', 'Three', 'A row of'])} {plural}")
    for noun, plural in _FOOD:
        kind = "produce" if noun in _PRODUCE else "drink" if noun in _DRINKS else "dish"
        out.append(f"A photo of {_a(noun)}")
        adj = rng.sample(_FOOD_ADJ[kind], 2)
        out.append(_cap(_a(f"{adj[0]} {noun}")) + " " + rng.choice(_FOOD_PLACES[kind]))
        out.append(f"A close-up of {_a(adj[1] + ' ' + noun)}")
        if kind == "produce":
            out.append(_cap(f"{rng.choice(['a basket of', 'a pile of', 'a crate of'])} "
                            f"{plural}"))
        else:
            out.append(f"Two {plural} on a table")
    return out


def _animals(rng: random.Random) -> list[str]:
    out = []
    for noun, (plural, group, kind) in _ANIMALS.items():
        actions = _ANIMAL_ACTIONS[kind]
        out.append(f"A photo of {_a(noun)}")
        for act in rng.sample(actions, min(3, len(actions))):
            out.append(_cap(f"{_a(noun)} {act}"))
        out.append(_cap(f"{group} {plural}"))
        out.append(f"A close-up of {_a(noun)}")
        out.append(f"A baby {noun}" if kind in ("wild", "farm") else f"A cute {noun}")
        out.append(f"A {rng.choice(['drawing', 'cartoon', 'painting', 'toy figure'])} "
                   f"of {_a(noun)}")
    out += [
        "A dog and a cat sleeping together", "A bird feeding its chicks",
        "A cat chasing a mouse", "A horse and rider jumping a fence", "A fish tank",
        "Animal tracks in the snow", "A butterfly with colorful wings", "A spider's web",
        "A herd of animals crossing a river", "Wildlife in the African savanna",
        "A pet shop", "A veterinarian examining a dog", "A dog catching a frisbee",
        "A cat on a windowsill", "A bird's nest with eggs", "A beehive",
    ]
    return out


def _people(rng: random.Random) -> list[str]:
    out = []
    for subject in _PEOPLE:
        for act in rng.sample(_PEOPLE_ACTIONS, 5):
            out.append(_cap(f"{subject} {act}"))
        out.append(f"A portrait of {subject}")
    for subject, acts in _PROFESSIONS.items():
        out.append(f"A photo of {subject}")
        for act in acts:
            out.append(_cap(f"{subject} {act}"))
    for trait in _PORTRAIT_TRAITS:
        who = rng.choice(["a man", "a woman", "a child", "an old woman", "a young man",
                          "a girl", "a boy", "a person"])
        out.append(f"A portrait of {who} {trait}")
        out.append(f"A close-up of a face {trait}" if trait.startswith("with")
                   else f"A person {trait}")
    out += [
        "A crowd at a concert", "People shopping at a market", "Commuters on a train",
        "A team celebrating a victory", "Children in a classroom", "A wedding ceremony",
        "A family dinner", "Tourists taking photos", "A street performer",
        "Runners in a marathon", "A soccer match", "Kids playing on a playground",
        "A line of people waiting", "A person seen from behind", "Hands holding a cup",
        "Hands typing on a keyboard", "A pair of feet in sneakers", "A silhouette of a person",
        "A person wearing a costume", "A parade on a city street", "A yoga class",
        "People dancing in the street", "An audience in a theater", "A graduation ceremony",
        "A birthday party with children", "A busy office with workers",
    ]
    return out


def _places(rng: random.Random) -> list[str]:
    out = []
    for place in _INDOOR + _OUTDOOR:
        chosen = rng.sample(_PLACE_PATTERNS, 3)
        for pattern in chosen:
            m = rng.choice(_PLACE_MODS)
            if place in _INDOOR and m not in _INDOOR_MODS:
                m = rng.choice(_INDOOR_MODS)
            out.append(pattern.format(p=place, P=_cap(place), m=m))
    out += [f"An indoor scene: {p}" for p in rng.sample(_INDOOR, 10)]
    out += [f"An outdoor scene: {p}" for p in rng.sample(_OUTDOOR, 10)]
    out += ["An indoor scene", "An outdoor scene", "Inside a building", "Outside in nature",
            "An urban environment", "A rural area", "A suburban street", "An industrial area"]
    return out


def _landscapes(rng: random.Random) -> list[str]:
    out = []
    for land in _LANDSCAPES:
        out.append(f"A photo of {land}")
        out.append(f"Image with {land}")
        mods = [m for m in _LANDSCAPE_MODS
                if not ("snow" in m and ("snow" in land or "glacier" in land
                                         or "frozen" in land or "tundra" in land))]
        for m in rng.sample(mods, 4):
            out.append(_cap(f"{land} {m}"))
        out.append(f"A painting of {land}")
    out += ["A snowy landscape", "A green landscape", "A barren landscape", "A lush valley",
            "Image with a snowy landscape", "A wild untouched landscape", "A natural scene",
            "A view of the horizon", "The open sea", "A night sky full of stars",
            "The Milky Way over the mountains", "The northern lights", "A full moon",
            "A solar eclipse", "Clouds seen from above"]
    return out


def _locations(rng: random.Random) -> list[str]:
    out = []
    for country in _COUNTRIES:
        for pattern in rng.sample(_COUNTRY_PATTERNS, 3):
            out.append(pattern.format(c=country))
    for city in _CITIES:
        for pattern in rng.sample(_CITY_PATTERNS, 3):
            out.append(pattern.format(c=city))
    out += ["A photo taken in Europe", "A photo taken in Asia", "A photo taken in Africa",
            "A photo taken in South America", "A photo taken in North America",
            "A photo taken in the Middle East", "A photo taken in Scandinavia",
            "A photo taken in the Caribbean", "A photo taken in Southeast Asia",
            "A photo taken in the Mediterranean", "A tropical country", "A Nordic country",
            "A scene from the American West", "An Asian city street", "A European old town",
            "A Latin American village", "An African market", "A Middle Eastern bazaar"]
    return out


def _colors(rng: random.Random) -> list[str]:
    out = []
    patterns = ["Image with a dominant {c} color", "A photo in shades of {c}",
                "Vibrant {c} tones", "A mostly {c} image", "Muted {c} hues",
                "{ac} background", "Something bright {c}", "A splash of {c}"]
    for color in _COLOR_NOUNS:
        for pattern in rng.sample(patterns, 4):
            out.append(_cap(pattern.format(c=color, ac=_a(color))))
    for _ in range(60):
        a, b = rng.sample(_COLOR_NOUNS[:20], 2)
        out.append(rng.choice(["{aa} and {b} color scheme", "Contrasting {a} and {b}",
                               "{A} and {b} stripes", "A gradient from {a} to {b}"]).format(
            a=a, b=b, A=_cap(a), aa=_cap(_a(a))))
    out += ["A black and white image", "A monochrome photo", "Rainbow colors",
            "Pastel colors", "Neon colors", "Earth tones", "Warm colors", "Cool colors",
            "A colorful image", "A very colorful scene", "Desaturated colors",
            "A high-saturation photo", "Sepia tones", "Bright primary colors",
            "Soft muted colors", "A dark color palette", "A light, airy color palette",
            "Metallic colors", "Fluorescent colors", "Autumn colors"]
    return out


def _textures(rng: random.Random) -> list[str]:
    out = []
    for t in _TEXTURES:
        out.append(f"A close-up of {t}")
        out.append(_cap(f"the texture of {t}"))
    for adj in _TEXTURE_ADJ:
        out.append(f"Image with a {adj} texture")
        out.append(_cap(_a(f"{adj} surface")))
    for pat in _PATTERNS:
        out.append(_cap(_a(f"{pat} pattern")))
        out.append(f"A {rng.choice(['shirt', 'dress', 'scarf', 'blanket', 'wallpaper'])} "
                   f"with a {pat} pattern")
    return out


def _shapes_materials(rng: random.Random) -> list[str]:
    out = []
    for s in _SHAPES:
        for pattern in rng.sample(_SHAPE_PATTERNS, 2):
            out.append(pattern.format(s=s))
    out += _SHAPE_EXTRA
    for m in _MATERIALS:
        for pattern in rng.sample(_MATERIAL_PATTERNS, 2):
            out.append(pattern.format(m=m))
    return out


def _counts(rng: random.Random) -> list[str]:
    out = []
    for noun, plural, place in _COUNTABLE:
        out.append(_cap(f"a single {noun} {place}"))
        for num in rng.sample(_NUMBERS, 3):
            out.append(_cap(f"{num} {plural} {place}"))
        out.append(_cap(f"{rng.choice(_QUANTIFIERS)} {plural}"))
    out += ["A group of five people", "Two people shaking hands", "Three friends laughing",
            "A large crowd", "An empty room with nobody in it", "A lone tree in a field",
            "A single person on a beach", "Hundreds of birds in the sky", "Pairs of shoes",
            "One of a kind", "A dozen eggs in a carton", "Twins", "Triplets in a stroller",
            "A number on a door", "Numbers on a clock face", "A countdown timer"]
    return out


def _styles(rng: random.Random) -> list[str]:
    out = []
    for style in _STYLES:
        for subject in rng.sample(_STYLE_SUBJECTS, 3):
            out.append(_cap(f"{style} of {subject}"))
        out.append(_cap(style))
    out += _STYLE_ONLY
    return out


def _moods(rng: random.Random) -> list[str]:
    out = []
    for mood in _MOODS:
        out.append(f"Image with {_a(mood)} atmosphere")
        scene = rng.choice(_MOOD_SCENES)
        out.append(_cap(_a(f"{mood} {scene}")))
        out.append(_cap(_a(f"{mood} mood")))
    out += _MOOD_EXTRA
    return out


def _lighting_weather_time(rng: random.Random) -> list[str]:
    out = []
    for light in _LIGHTING:
        out.append(_cap(light))
        for subject in rng.sample(_LIGHT_SUBJECTS, 2):
            out.append(_cap(f"{subject} in {light}"))
    for adj, when in _WEATHER:
        for scene in rng.sample(_WEATHER_SCENES, 3):
            out.append(_cap(_a(f"{adj} {scene}")))
        out.append(f"A photo taken {when}")
        out.append(f"A {rng.choice(_WEATHER_SCENES)} {when}")
    out += _WEATHER_EXTRA
    for time in _TIMES:
        for scene in rng.sample(_TIME_SCENES, 4):
            out.append(_cap(f"{scene} {time}"))
        out.append(f"A photo taken {time}")
    return out


def _art(rng: random.Random) -> list[str]:
    out = []
    for adj, name in _MOVEMENTS:
        out.append(f"Artwork in the style of {name}")
        for subject in rng.sample(_MOVEMENT_SUBJECTS, 3):
            if adj is None:
                out.append(_cap(f"{_a(subject)} in the style of {name}"))
            else:
                out.append(_cap(_a(f"{adj} {subject}")))
    out += ["A painting in a museum", "A famous painting", "A classical sculpture",
            "An abstract sculpture", "A modern art installation", "A fresco on a ceiling",
            "A religious icon", "A self-portrait of a painter", "A landscape painting",
            "A still life with fruit", "A portrait painting of a nobleman"]
    return out


def _viewpoints(rng: random.Random) -> list[str]:
    out = []
    for pattern in _VIEWS_LARGE:
        for subject in rng.sample(_VIEW_LARGE_SUBJECTS, 5):
            out.append(pattern.format(x=subject))
    for pattern in _VIEWS_SMALL:
        for subject in rng.sample(_VIEW_SMALL_SUBJECTS, 5):
            out.append(pattern.format(x=subject))
    out += _VIEW_EXTRA
    return out


def _shapes_world(rng: random.Random) -> list[str]:
    """Descriptions of the toy model's scenes, in words its tokenizer knows."""
    out = []
    for shape in _TOY_SHAPES:
        out.append(f"a {shape}")
        out.append(f"a photo of a {shape}")
        out.append(f"a picture of a {shape} shape")
        for color in _TOY_COLORS:
            out.append(_a(f"{color} {shape}"))
        for size in _TOY_SIZES:
            out.append(f"a {size} {shape}")
        for ground in _TOY_GROUNDS:
            out.append(f"a {shape} {rng.choice(_TOY_PREPS)} {ground}")
        for pos in rng.sample(_TOY_POSITIONS, 5):
            out.append(f"a {shape} {rng.choice(['in the', 'at the'])} {pos}")
    for color in _TOY_COLORS:
        out.append(f"something {color}")
        out.append(f"a photo of {_a(color)} object")
        out.append(_a(f"{color} shape"))
        for ground in rng.sample(_TOY_GROUNDS, 4):
            out.append(_a(f"{color} shape {rng.choice(_TOY_PREPS)} {ground}"))
    for pos in _TOY_POSITIONS:
        out.append(f"a shape in the {pos}")
        out.append(f"a photo of an object in the {pos}")
        out.append(f"something at the {pos}")
    for bg in _TOY_BG_WORDS:
        out.append(f"a photo of an object on {bg}")
        out.append(f"a shape with a {bg} background")
        out.append(f"something on a {bg} background")
        out.append(f"a scene with {bg}")
    for count in _TOY_COUNTS:
        out.append(f"{count} shapes" if count != "one" else "one shape")
        out.append(f"a photo of {count} objects" if count != "one" else "a photo of one object")
    for size in _TOY_SIZES:
        out.append(f"a {size} shape")
        out.append(f"a photo of a {size} object")
    for _ in range(260):
        size, color, shape = (rng.choice(_TOY_SIZES), rng.choice(_TOY_COLORS),
                              rng.choice(_TOY_SHAPES))
        ground, prep = rng.choice(_TOY_GROUNDS), rng.choice(_TOY_PREPS)
        pos = rng.choice(_TOY_POSITIONS)
        form = rng.randrange(5)
        if form == 0:
            out.append(f"a {size} {color} {shape} {prep} {ground}")
        elif form == 1:
            out.append(_a(f"{color} {shape} in the {pos}"))
        elif form == 2:
            out.append(f"a photo of a {size} {color} {shape} in the {pos} {prep} {ground}")
        elif form == 3:
            c2, s2 = rng.choice(_TOY_COLORS), rng.choice(_TOY_SHAPES)
            out.append(f"two shapes: {_a(color)} {shape} and {_a(c2)} {s2}")
        else:
            out.append(f"an image of {_a(color)} {shape} with a {rng.choice(_TOY_BG_WORDS)} "
                       "background")
    return out


_SECTIONS = [
    ("objects and food", _objects),
    ("animals", _animals),
    ("people", _people),
    ("places, indoor and outdoor", _places),
    ("landscapes and nature", _landscapes),
    ("countries and cities", _locations),
    ("colours", _colors),
    ("textures and patterns", _textures),
    ("shapes and materials", _shapes_materials),
    ("counts", _counts),
    ("styles and media", _styles),
    ("moods", _moods),
    ("lighting, weather and times of day", _lighting_weather_time),
    ("art movements", _art),
    ("viewpoints", _viewpoints),
    ("the shapes world (clipdecomp.toy vocabulary)", _shapes_world),
]


def generate_descriptions(seed: int = 0) -> list[tuple[str, list[str]]]:
    """The shipped pool, section by section: ``[(section title, descriptions), ...]``.

    Deterministic for a given ``seed``; a description appears once (first section wins,
    case-insensitive).

    Examples
    --------
    >>> sections = generate_descriptions()
    >>> sum(len(lines) for _, lines in sections) >= 3000
    True
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    for title, make in _SECTIONS:
        lines = []
        for text in make(rng):
            text = " ".join(text.split())
            key = text.lower().rstrip(".")
            if key in seen:
                continue
            seen.add(key)
            lines.append(text)
        out.append((title, lines))
    return out


def write_descriptions(path: str | os.PathLike | None = None, seed: int = 0) -> int:
    """Write :func:`generate_descriptions` to ``path`` (default: the shipped file).

    Returns
    -------
    int
        Number of descriptions written.

    Examples
    --------
    >>> import os, tempfile
    >>> write_descriptions(os.path.join(tempfile.mkdtemp(), "pool.txt")) >= 3000
    True
    """
    path = DEFAULT_POOL if path is None else Path(path)
    sections = generate_descriptions(seed)
    n = sum(len(lines) for _, lines in sections)
    with open(path, "w", encoding="utf-8") as f:
        f.write("# clipdecomp description pool: short image descriptions, one a line.\n")
        f.write(f"# {n} descriptions; '#' lines are section titles and are skipped.\n")
        for title, lines in sections:
            f.write(f"\n# {title}\n")
            f.write("\n".join(lines) + "\n")
    return n
