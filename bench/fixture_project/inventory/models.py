"""The items a store keeps."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Item:
    """One kind of thing on the shelves, identified by its SKU."""

    sku: str
    name: str
    unit_price: float
    category: str = "general"
    tags: tuple = field(default_factory=tuple)

    def __post_init__(self):
        if not self.sku or not self.sku.strip():
            raise ValueError("an item needs a SKU")
        if self.unit_price < 0:
            raise ValueError("a price cannot be negative: %r" % self.unit_price)

    @property
    def label(self):
        """What a shelf label shows."""
        return "%s (%s)" % (self.name, self.sku)

    def with_price(self, unit_price):
        """The same item at another price."""
        return Item(self.sku, self.name, unit_price, self.category, self.tags)

    def matches(self, text):
        """Whether a search text matches the SKU, the name or a tag (case-insensitive)."""
        text = text.lower()
        return (text in self.sku.lower() or text in self.name.lower()
                or any(text in tag.lower() for tag in self.tags))
