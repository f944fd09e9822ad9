"""Progress displays: the model, the text bar, the widget and the driver that feeds them."""
