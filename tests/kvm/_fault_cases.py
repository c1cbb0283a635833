"""The accesses whose stage-2 fault counts the simulator is checked on (tests/kvm/
test_translation_faults.py) and that were measured on the real KVM (tests/realkvm/
test_realkvm_faults.py): a data memslot of PAGES pages, nothing mapped yet."""

PAGES = 1536
ALL = list(range(PAGES))
CASES = {
    # name: (accesses, the indices among them that are loads, the slot logs, populated)
    "not-logged-populated-stores": (ALL, [], False, True),
    "not-logged-populated-every-3rd": (ALL[::3], [], False, True),
    "not-logged-fresh-stores": (ALL, [], False, False),
    "not-logged-populated-loads-then-stores": (ALL + ALL, ALL, False, True),
    "not-logged-fresh-loads-then-stores": (ALL + ALL, ALL, False, False),
    "logged-populated-stores": (ALL, [], True, True),
    "logged-fresh-loads-then-stores": (ALL + ALL, ALL, True, False),
    "logged-populated-loads-then-stores": (ALL + ALL, ALL, True, True),
}
