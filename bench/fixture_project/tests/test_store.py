import unittest

from inventory import Item, OutOfStock, Store


def sample():
    store = Store()
    store.add(Item("bolt", "Hex bolt M6", 0.12, "fasteners", ("m6",)), 500)
    store.add(Item("nut", "Hex nut M6", 0.05, "fasteners", ("m6",)), 8)
    store.add(Item("saw", "Hand saw", 14.5, "tools"), 3)
    return store


class StoreTest(unittest.TestCase):
    def test_take_and_out_of_stock(self):
        store = sample()
        store.take("bolt", 100)
        self.assertEqual(store.quantity("bolt"), 400)
        with self.assertRaises(OutOfStock):
            store.take("saw", 4)

    def test_find_and_low_stock(self):
        store = sample()
        self.assertEqual([item.sku for item in store.find("m6")], ["bolt", "nut"])
        self.assertEqual([(item.sku, count) for item, count in store.low_stock()], [("saw", 3), ("nut", 8)])

    def test_value(self):
        self.assertAlmostEqual(sample().value(), 500 * 0.12 + 8 * 0.05 + 3 * 14.5)

    def test_restock_and_history(self):
        clock = iter(range(1000, 2000)).__next__
        store = Store(clock=lambda: clock())
        store.add(Item("bolt", "Hex bolt M6", 0.12, "fasteners"), 10)
        store.take("bolt", 4)
        store.restock("bolt", 50)
        self.assertEqual(store.quantity("bolt"), 56)
        self.assertEqual([(m.change, m.reason) for m in store.history("bolt")], [(-4, "sale"), (50, "delivery")])

    def test_reservations_hold_units(self):
        store = sample()
        store.reserve("saw", 2, "order-1")
        self.assertEqual(store.reserved("saw"), 2)
        self.assertEqual(store.available("saw"), 1)
        with self.assertRaises(OutOfStock):
            store.reserve("saw", 2, "order-2")
        self.assertEqual(store.ship("saw", "order-1"), 2)
        self.assertEqual((store.quantity("saw"), store.available("saw")), (1, 1))

    def test_reorder_suggestions(self):
        now = [0.0]
        store = Store(clock=lambda: now[0])
        store.add(Item("nut", "Hex nut M6", 0.05, "fasteners"), 100)
        store.set_supplier("nut", "Acme", lead_days=5, pack=50)
        now[0] = 29 * 86400.0
        store.take("nut", 90)
        now[0] = 30 * 86400.0
        self.assertEqual(store.reorder_suggestions(), [("nut", "Acme", 1)])
