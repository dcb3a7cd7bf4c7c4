import unittest

from inventory.io import load_csv
from inventory.report import quote, stock_report

CSV = """sku,name,unit_price,category,quantity
bolt,Hex bolt M6,0.12,fasteners,500
saw,Hand saw,14.50,tools,3
"""


class ReportTest(unittest.TestCase):
    def test_report_names_low_stock(self):
        text = stock_report(load_csv(CSV))
        self.assertIn("Running low (under 10):", text)
        self.assertIn("Hand saw (saw): 3", text)
        self.assertTrue(text.endswith("Total value: 103.50"))

    def test_quote_total(self):
        self.assertTrue(quote(load_csv(CSV), {"saw": 2}).endswith("29.00"))
