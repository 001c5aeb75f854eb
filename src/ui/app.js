// flux UI
