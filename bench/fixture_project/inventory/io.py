"""CSV import and export: sku,name,unit_price,category,quantity,tags (tags separated by '|')."""

import csv
import io

from .models import Item
from .store import Store

FIELDS = ["sku", "name", "unit_price", "category", "quantity", "tags"]


def load_csv(text):
    """A Store from CSV text with a header row."""
    store = Store()
    reader = csv.DictReader(io.StringIO(text))
    missing = [name for name in FIELDS[:3] if name not in (reader.fieldnames or [])]
    if missing:
        raise ValueError("missing columns: %s" % ", ".join(missing))
    for number, row in enumerate(reader, start=2):
        try:
            item = Item(row["sku"].strip(), row["name"].strip(), float(row["unit_price"]),
                        (row.get("category") or "general").strip(),
                        tuple(tag for tag in (row.get("tags") or "").split("|") if tag))
            store.add(item, int(row.get("quantity") or 0))
        except (TypeError, ValueError) as error:
            raise ValueError("line %d: %s" % (number, error)) from None
    return store


def dump_csv(store):
    """CSV text for a store, rows by SKU."""
    out = io.StringIO()
    writer = csv.DictWriter(out, FIELDS, lineterminator="\n")
    writer.writeheader()
    for item in store.find(""):
        writer.writerow({"sku": item.sku, "name": item.name, "unit_price": "%.2f" % item.unit_price,
                         "category": item.category, "quantity": store.quantity(item.sku),
                         "tags": "|".join(item.tags)})
    return out.getvalue()
