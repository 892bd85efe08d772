"""Readable English captions for defect regions, from a dataset's (defect type, object) labels.

Dataset labels are folder or class names ("scratches", "broken_large", "uneven"); a describer ranks
sentences, so every label becomes a singular noun phrase with its article and the preposition that
reads right with the object ("a scratch on the steel strip", "a blowhole in the magnetic tile").
The paper had GPT-4o rewrite its class names once; here a fixed table does it, so captions are
deterministic and need no network. Unknown labels fall back to their words plus "defect".
"""

from __future__ import annotations

from dataclasses import dataclass

# Templates over a defect phrase ("a scratch"), its preposition ("on") and the object ("steel strip").
# Index 0 is the canonical caption: the one stored with each region and ranked by a describer.
TEMPLATES = (
    "{defect} {prep} the {object}",
    "a photo of {object_article} {object} with {defect}",
    "{object_article} {object} showing {defect}",
    "a close-up of {defect} {prep} the {object}",
)


@dataclass(frozen=True)
class DefectName:
    """How one defect label reads: a noun phrase without article, its article, and a preposition."""

    noun: str
    prep: str = "on"
    article: str | None = None  # None: chosen from the spelling by `indefinite_article`

    @property
    def phrase(self) -> str:
        article = self.article if self.article is not None else indefinite_article(self.noun)
        return f"{article} {self.noun}".strip()


# Labels of the two development datasets, of MVTec AD and of other common industrial sets. Holes and
# cracks go *in* the object; marks lying on its surface go *on* it.
DEFECT_NAMES: dict[str, DefectName] = {
    # NEU-Seg (steel strip)
    "inclusion": DefectName("inclusion", "in"),
    "patches": DefectName("patch"),
    "scratches": DefectName("scratch"),
    # Magnetic Tile Defect
    "blowhole": DefectName("blowhole", "in"),
    "break": DefectName("break", "in"),
    "crack": DefectName("crack", "in"),
    "fray": DefectName("frayed edge"),
    "uneven": DefectName("uneven area"),
    # MVTec AD
    "bent": DefectName("bent part", "in"),
    "bent_lead": DefectName("bent lead"),
    "bent_wire": DefectName("bent wire", "in"),
    "broken": DefectName("broken part", "in"),
    "broken_large": DefectName("large break", "in"),
    "broken_small": DefectName("small break", "in"),
    "broken_teeth": DefectName("broken tooth", "in"),
    "cable_swap": DefectName("swapped cable", "in"),
    "color": DefectName("discoloured spot"),
    "combined": DefectName("combination of defects", "in"),
    "contamination": DefectName("contamination", "on", "some"),
    "cut": DefectName("cut", "in"),
    "cut_inner_insulation": DefectName("cut in the inner insulation", "of"),
    "cut_lead": DefectName("cut lead"),
    "cut_outer_insulation": DefectName("cut in the outer insulation", "of"),
    "damaged_case": DefectName("damaged case"),
    "defective": DefectName("defect", "in"),
    "fabric_border": DefectName("fabric border defect", "in"),
    "fabric_interior": DefectName("fabric interior defect", "in"),
    "faulty_imprint": DefectName("faulty imprint"),
    "flip": DefectName("flipped part", "in"),
    "fold": DefectName("fold", "in"),
    "glue": DefectName("glue stain"),
    "glue_strip": DefectName("glue strip"),
    "gray_stroke": DefectName("grey stroke"),
    "hole": DefectName("hole", "in"),
    "liquid": DefectName("liquid stain"),
    "manipulated_front": DefectName("manipulated front"),
    "metal_contamination": DefectName("metal contamination", "on", "some"),
    "misplaced": DefectName("misplaced part", "in"),
    "missing_cable": DefectName("missing cable", "in"),
    "missing_wire": DefectName("missing wire", "in"),
    "oil": DefectName("oil stain"),
    "pill_type": DefectName("wrong pill type", "in"),
    "poke": DefectName("poke", "in"),
    "poke_insulation": DefectName("poke in the insulation", "of"),
    "print": DefectName("misprint"),
    "rough": DefectName("rough area"),
    "scratch": DefectName("scratch"),
    "scratch_head": DefectName("scratch on the head", "of"),
    "scratch_neck": DefectName("scratch on the neck", "of"),
    "split_teeth": DefectName("split tooth", "in"),
    "squeeze": DefectName("squeezed part", "in"),
    "squeezed_teeth": DefectName("squeezed tooth", "in"),
    "stain": DefectName("stain"),
    "thread": DefectName("loose thread"),
    "thread_side": DefectName("thread on the side", "of"),
    "thread_top": DefectName("thread on the top", "of"),
    "crack_or_hole": DefectName("crack or hole", "in"),
    # Other common industrial sets (KolektorSDD, DAGM, Severstal, GC10-DET)
    "crease": DefectName("crease", "in"),
    "crescent_gap": DefectName("crescent gap", "in"),
    "dent": DefectName("dent", "in"),
    "pitted_surface": DefectName("pitted area"),
    "pitting": DefectName("pitted area"),
    "rolled_in_scale": DefectName("rolled-in scale", "on", "some"),
    "rust": DefectName("rust spot"),
    "spot": DefectName("spot"),
    "water_spot": DefectName("water spot"),
    "welding_line": DefectName("welding line"),
    "waist_folding": DefectName("waist fold", "in"),
    "silk_spot": DefectName("silk spot"),
    "punching_hole": DefectName("punched hole", "in"),
}

# Words that already name a defect, so a fallback like "oil_spots" reads "an oil spot", not "an oil
# spots defect". Plurals are folded to these singulars.
_DEFECT_NOUNS = {
    "abrasion", "blister", "bubble", "bump", "burr", "chip", "crack", "crease", "cut", "defect", "dent",
    "fold", "gap", "hole", "inclusion", "line", "mark", "patch", "pit", "scratch", "spot", "stain",
    "streak", "stripe", "tear", "void", "wrinkle",
}

# Words where spelling misleads the a/an choice: a vowel letter sounding like "you"/"w", or a silent h.
_A_BEFORE = ("unic", "unif", "unil", "union", "uniq", "unit", "univ", "use", "usu", "uti", "ure", "eu", "one", "once")
_AN_BEFORE = ("hour", "honest", "honour", "honor", "heir")


def indefinite_article(phrase: str) -> str:
    """'a' or 'an' for a noun phrase, by the sound of its first word (not just its first letter)."""
    word = phrase.strip().lower()
    if not word:
        return "a"
    if word.startswith(_AN_BEFORE):
        return "an"
    if word.startswith(_A_BEFORE):
        return "a"
    return "an" if word[0] in "aeiou" else "a"


def label_words(label: str) -> str:
    """'Broken_Large' / 'broken-large' -> 'broken large'."""
    return " ".join(label.replace("_", " ").replace("-", " ").split()).lower()


def _singular(word: str) -> str | None:
    """The singular of a known defect noun ('scratches' -> 'scratch'), else None."""
    for cut in ("es", "s", ""):
        if word.endswith(cut) and word[: len(word) - len(cut)] in _DEFECT_NOUNS:
            return word[: len(word) - len(cut)]
    return None


def defect_name(label: str) -> DefectName:
    """The readable name of a defect label: the table's entry, else a fallback from the label's words."""
    key = label_words(label).replace(" ", "_")
    if key in DEFECT_NAMES:
        return DEFECT_NAMES[key]
    words = label_words(label).split()
    if not words:
        raise ValueError("A defect label must contain a letter or digit, got an empty label.")
    singular = _singular(words[-1])
    if singular is not None:
        return DefectName(" ".join(words[:-1] + [singular]))
    return DefectName(" ".join(words + ["defect"]))


def defect_phrase(label: str) -> str:
    """'scratches' -> 'a scratch'; 'inclusion' -> 'an inclusion'; 'glass_shard' -> 'a glass shard defect'."""
    return defect_name(label).phrase


def object_phrase(object_name: str) -> str:
    """'metal_nut' -> 'metal nut'."""
    words = label_words(object_name)
    if not words:
        raise ValueError("An object name must contain a letter or digit, got an empty name.")
    return words


def caption(defect: str, object_name: str, template_index: int = 0) -> str:
    """A caption for one region: caption('blowhole', 'magnetic tile') -> 'a blowhole in the magnetic tile'."""
    if not 0 <= template_index < len(TEMPLATES):
        raise ValueError(f"template_index must be in 0..{len(TEMPLATES) - 1}, got {template_index}")
    name = defect_name(defect)
    obj = object_phrase(object_name)
    return TEMPLATES[template_index].format(
        defect=name.phrase, prep=name.prep, object=obj, object_article=indefinite_article(obj)
    )


def all_captions(defect: str, object_name: str) -> list[str]:
    """Every template's caption for one (defect, object) pair, canonical first (for augmentation)."""
    return [caption(defect, object_name, i) for i in range(len(TEMPLATES))]


def candidate_captions(object_name: str, defect_types) -> list[str]:
    """The canonical caption of each defect type of an object, in the given order, without repeats:
    the candidate set a describer ranks for a region of that object."""
    candidates: list[str] = []
    for defect in defect_types:
        text = caption(defect, object_name)
        if text not in candidates:
            candidates.append(text)
    return candidates


NO_DEFECT = "no defect"


def no_defect_caption(object_name: str) -> str:
    """The caption of a region with nothing wrong: no_defect_caption('magnetic tile') ->
    'no defect: a normal area of the magnetic tile'. It starts with NO_DEFECT so the app can say so plainly."""
    return f"{NO_DEFECT}: a normal area of the {object_phrase(object_name)}"
