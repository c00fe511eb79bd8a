//! NumPy `.npy` (format 1.0) for the embedding shards: little-endian float32 / float16 arrays in C
//! order — what Python's webdataset decodes with `np.load`.

use half::f16;

#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: NpyData,
}

impl NpyArray {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self {
            shape,
            data: NpyData::F32(data),
        }
    }

    /// The values as f32 whatever the stored precision.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            NpyData::F32(v) => v.clone(),
            NpyData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let descr = match self.data {
            NpyData::F32(_) => "<f4",
            NpyData::F16(_) => "<f2",
        };
        let shape = match self.shape.len() {
            1 => format!("({},)", self.shape[0]),
            _ => format!(
                "({})",
                self.shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        // Magic (6) + version (2) + length (2) + header + '\n', padded to a multiple of 64.
        let unpadded = 10 + header.len() + 1;
        header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        match &self.data {
            NpyData::F32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
            NpyData::F16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        }
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
            return Err("not a .npy file".into());
        }
        let (header_len, start) = match bytes[6] {
            1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
            2 | 3 if bytes.len() >= 12 => (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            ),
            v => return Err(format!("unsupported .npy version {v}")),
        };
        let header = bytes
            .get(start..start + header_len)
            .and_then(|h| std::str::from_utf8(h).ok())
            .ok_or("truncated .npy header")?;
        if header.contains("'fortran_order': True") {
            return Err("Fortran-ordered .npy arrays are not supported".into());
        }
        let field = |key: &str| -> Result<&str, String> {
            let at = header
                .find(&format!("'{key}':"))
                .ok_or(format!(".npy header has no {key}"))?;
            Ok(header[at + key.len() + 3..].trim_start())
        };
        let descr = field("descr")?;
        let shape_text = field("shape")?;
        let close = shape_text.find(')').ok_or("bad .npy shape")?;
        let shape = shape_text[1..close]
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<usize>()
                    .map_err(|e| format!("bad .npy shape: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let n: usize = shape.iter().product();
        let body = &bytes[start + header_len..];
        let data = if descr.starts_with("'<f4'") {
            if body.len() != n * 4 {
                return Err(format!("{} bytes of data for {n} float32", body.len()));
            }
            NpyData::F32(
                body.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        } else if descr.starts_with("'<f2'") {
            if body.len() != n * 2 {
                return Err(format!("{} bytes of data for {n} float16", body.len()));
            }
            NpyData::F16(
                body.chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            )
        } else {
            return Err(format!(
                "unsupported .npy dtype {}",
                descr.split(',').next().unwrap_or(descr)
            ));
        };
        Ok(Self { shape, data })
    }
}
