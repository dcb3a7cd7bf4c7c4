import unittest

from inventory.io import dump_csv, load_csv

CSV = """sku,name,unit_price,category,quantity,tags
bolt,Hex bolt M6,0.12,fasteners,500,m6|zinc
saw,Hand saw,14.50,tools,3,
"""


class CsvTest(unittest.TestCase):
    def test_round_trip(self):
        self.assertEqual(dump_csv(load_csv(CSV)), CSV)

    def test_missing_columns(self):
        with self.assertRaises(ValueError):
            load_csv("sku,name\nx,y\n")

    def test_bad_line_is_named(self):
        with self.assertRaisesRegex(ValueError, "line 2"):
            load_csv("sku,name,unit_price\nx,y,cheap\n")
