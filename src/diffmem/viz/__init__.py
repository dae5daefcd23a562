"""What a person looks at: matplotlib figures written as PNG (galleries, sample grids, landscapes,
strip plots) and the HTML fragments of reports."""
